/* _copyruns_parts.h: part of _copyruns.c, which includes its parts once, in this order:
 * kernels, plan, request, parts (see its docstring).  This part: the scatter-gather result:
 * Pin, Span, plan_parts. */
/* ---- scatter-gather parts ---------------------------------------------------------------- */

/* Pin: one export of a plan_parts source buffer, shared by that result's spans (so the
 * source cannot be resized or freed while any span lives). */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
} Pin;

static void
pin_dealloc(Pin *self)
{
    PyBuffer_Release(&self->view);
    PyObject_Free(self);
}

static PyTypeObject PinType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "root_worker.frame._copyruns.Pin",
    .tp_basicsize = sizeof(Pin),
    .tp_dealloc = (destructor)pin_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An export of a trim_parts source buffer, held by its spans.",
};

/* Span: a read-only bytes-like view of len bytes of a pinned source (buffer protocol and
 * len()); a tenth of the cost of a memoryview slice, which needs a slice object, two ints
 * and a managed buffer per part. */
typedef struct {
    PyObject_HEAD
    Pin *pin;
    const char *buf;
    Py_ssize_t len;
} Span;

static void
span_dealloc(Span *self)
{
    Py_DECREF(self->pin);
    PyObject_Free(self);
}

static int
span_getbuffer(Span *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->buf, self->len, 1, flags);
}

static Py_ssize_t
span_length(Span *self)
{
    return self->len;
}

static PyObject *
span_repr(Span *self)
{
    return PyUnicode_FromFormat("<Span of %zd bytes at offset %zd>", self->len,
                                (Py_ssize_t)(self->buf - (const char *)self->pin->view.buf));
}

static PyBufferProcs span_as_buffer = {(getbufferproc)span_getbuffer, NULL};
static PySequenceMethods span_as_sequence = {.sq_length = (lenfunc)span_length};

static PyTypeObject SpanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "root_worker.frame._copyruns.Span",
    .tp_basicsize = sizeof(Span),
    .tp_dealloc = (destructor)span_dealloc,
    .tp_repr = (reprfunc)span_repr,
    .tp_as_sequence = &span_as_sequence,
    .tp_as_buffer = &span_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A read-only bytes-like part of a trimmed frame: a range of the input buffer, "
              "valid (and keeping the input exported) while it lives.",
};

static PyObject *
new_span(Pin *pin, uint64_t offset, uint64_t len)
{
    Span *span = PyObject_New(Span, &SpanType);
    if (span != NULL) {
        Py_INCREF(pin);
        span->pin = pin;
        span->buf = (const char *)pin->view.buf + offset;
        span->len = (Py_ssize_t)len;
    }
    return (PyObject *)span;
}

/* The scatter-gather list: [header bytes, a span of src per run..., the metadata span];
 * the header (header_len bytes) and runs are already built. */
static PyObject *
gather_list(PyObject *src_obj, const request *rq, PyObject *header, run_list rl)
{
    Pin *pin = NULL;
    PyObject *parts = PyList_New((Py_ssize_t)(rl.n_runs + 2));
    if (parts == NULL || (pin = PyObject_New(Pin, &PinType)) == NULL) {
        goto fail;
    }
    if (PyObject_GetBuffer(src_obj, &pin->view, PyBUF_SIMPLE) < 0) {
        PyObject_Free(pin); /* not initialised: no buffer to release */
        pin = NULL;
        goto fail;
    }
    if (pin->view.buf != rq->s || pin->view.len != rq->n) {
        PyErr_SetString(PyExc_BufferError, "plan_parts: the source moved during the call");
        goto fail;
    }
    PyList_SET_ITEM(parts, 0, Py_NewRef(header));
    for (uint64_t i = 0; i <= rl.n_runs; i++) {
        PyObject *span = i < rl.n_runs ? new_span(pin, rl.runs[2 * i], rl.runs[2 * i + 1])
                                       : new_span(pin, rq->meta_off, rq->meta_len);
        if (span == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(parts, (Py_ssize_t)(i + 1), span);
    }
    Py_DECREF(pin);
    return parts;
fail:
    Py_XDECREF(pin);
    Py_XDECREF(parts); /* unfilled slots are NULL: list_dealloc skips them */
    return NULL;
}

/* [memoryview of one new contiguous copy of the trimmed frame], or NULL. */
static PyObject *
one_copy(const request *rq)
{
    PyObject *parts = NULL, *data = output_view(Py_None, rq->out_meta + rq->meta_len);
    if (data != NULL && write_trimmed((char *)PyMemoryView_GET_BUFFER(data)->buf, rq) == 0) {
        parts = PyList_New(1);
        if (parts != NULL) {
            PyList_SET_ITEM(parts, 0, Py_NewRef(data));
        }
    }
    Py_XDECREF(data);
    return parts;
}

static PyObject *
plan_parts(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (check_call("plan_parts", args, nargs, 6, 5) < 0) {
        return NULL;
    }
    int check_ragged = PyObject_IsTrue(args[3]);
    Py_ssize_t max_parts = PyLong_AsSsize_t(args[4]);
    if (check_ragged < 0 || (max_parts == -1 && PyErr_Occurred())) {
        return NULL;
    }
    Py_buffer src;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    request rq = {0};
    scratch sc; /* (not zeroed: 8 KB) */
    sc.runs = NULL;
    PyObject *result = NULL, *parts = NULL, *header = NULL;
    int ok = read_request(args[0], &src, args[2], check_ragged, &rq, NULL);
    if (ok <= 0) {
        result = ok < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    if (scratch_init(&sc, &rq) < 0
        || (header = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)rq.h->header_len)) == NULL) {
        goto done;
    }
    run_list rl = output_runs(PyBytes_AS_STRING(header), &rq, sc.runs);
    if (rl.n_runs + 2 <= (uint64_t)(max_parts < 1 ? 1 : max_parts)) {
        parts = gather_list(args[1], &rq, header, rl);
    }
    else { /* too many parts for one sendmsg: one contiguous copy */
        parts = one_copy(&rq);
    }
    if (parts != NULL) {
        result = make_result((PyTypeObject *)args[5], parts, src.len,
                             (Py_ssize_t)(rq.out_meta + rq.meta_len), rq.h->n_kept,
                             rq.h->n_missing);
    }
done:
    if (sc.runs != NULL) {
        scratch_free(&sc);
    }
    Py_XDECREF(header);
    Py_XDECREF(parts);
    request_release(&rq);
    PyBuffer_Release(&src);
    return result;
}
