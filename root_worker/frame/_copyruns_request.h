/* _copyruns_request.h: part of _copyruns.c, which includes its parts once, in this order:
 * kernels, plan, request, parts (see its docstring).  This part: one request: read_request,
 * the output header and runs, the copy, plan_trim. */
/* The cache key for keybuf, as a bytes object.  The last one is kept and reused while
 * requests repeat it (a bytes object caches its hash, so the dict lookup then hashes
 * nothing); a borrowed reference, valid while the GIL is held. */
static PyObject *last_key = NULL;

static PyObject *
plan_key(const char *keybuf)
{
    if (last_key == NULL || memcmp(PyBytes_AS_STRING(last_key), keybuf, PLAN_KEY_SIZE) != 0) {
        PyObject *key = PyBytes_FromStringAndSize(keybuf, PLAN_KEY_SIZE);
        if (key == NULL) {
            return NULL;
        }
        Py_XSETREF(last_key, key);
    }
    return last_key;
}

/* The plan cache's entry for keybuf (borrowed), checked to be a Plan (made by make_plan,
 * so its blob is consistent); NULL if there is none (no exception) or it is anything else
 * (TypeError: nothing else is ever read as a plan). */
static PyObject *
lookup_entry(PyObject *cache, const char *keybuf)
{
    PyObject *key = plan_key(keybuf);
    if (key == NULL) {
        return NULL;
    }
    PyObject *entry = PyDict_GetItemWithError(cache, key);
    if (entry != NULL && !Py_IS_TYPE(entry, &PlanType)) {
        PyErr_Format(PyExc_TypeError, "trimmer plan cache entries must be Plan objects made "
                     "by make_plan, not %.100s", Py_TYPE(entry)->tp_name);
        return NULL;
    }
    return entry;
}

/* A TrimEntry's last plan: its key and entry (a strong reference, checked when stored).
 * A request with the same key uses it without the dict lookup (on a cache-cold worker the
 * dict's table, its key and the key cache are a few misses).  An entry the LRU has since
 * evicted is still right: it is the plan of exactly those layout bytes (compared per
 * request) under that allowlist digest, the dict's key. */
typedef struct {
    PyObject *entry;
    char key[PLAN_KEY_SIZE];
} plan_slot;

static int memo_store(Plan *plan, request *rq);

/* Read and validate one request against its cached plan: 1 if it can be served (rq filled,
 * rq->entry a new reference), 0 if not (no entry, anything differs or is invalid: the
 * general path then serves it or words the error), -1 with an exception set.  slot: the
 * caller's last plan (NULL: none). */
static int
read_request(PyObject *cache, const Py_buffer *src, PyObject *digest_obj, int check_ragged,
             request *rq, plan_slot *slot)
{
    const char *s = (const char *)src->buf;
    const Py_ssize_t n = src->len;
    unsigned long long digest = PyLong_AsUnsignedLongLong(digest_obj);
    if (digest == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* not a u64 digest: never cached */
        return 0;
    }
    if (!preamble_ok(s, n)) {
        return 0;
    }
    uint64_t n_columns = load_le(s + FRAME_N_COLUMNS_AT, FRAME_N_COLUMNS_SIZE);
    uint64_t layout_len = load_le(s + FRAME_LAYOUT_LEN_AT, FRAME_LAYOUT_LEN_SIZE);
    rq->n_cand = load_le(s + FRAME_N_CANDIDATES_AT, FRAME_N_CANDIDATES_SIZE);
    rq->meta_off = load_le(s + FRAME_META_OFFSET_AT, FRAME_META_OFFSET_SIZE);
    rq->meta_len = load_le(s + FRAME_META_LEN_AT, FRAME_META_LEN_SIZE);
    if (rq->meta_off > (uint64_t)n || rq->meta_len != (uint64_t)n - rq->meta_off) {
        return 0;
    }
    char keybuf[PLAN_KEY_SIZE];
    memcpy(keybuf, s + FRAME_LAYOUT_HINT_AT, 8); /* the layout hint, as on the wire (LE) */
    store_le(keybuf + 8, digest, 8);
    PyObject *entry;
    if (slot != NULL && slot->entry != NULL && memcmp(slot->key, keybuf, PLAN_KEY_SIZE) == 0) {
        entry = slot->entry;
    }
    else if ((entry = lookup_entry(cache, keybuf)) == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    else if (slot != NULL) {
        Py_XSETREF(slot->entry, Py_NewRef(entry));
        memcpy(slot->key, keybuf, PLAN_KEY_SIZE);
    }
    PyObject *layout = ((Plan *)entry)->layout;
    const char *blob = ((Plan *)entry)->blob;
    const plan_head *h = (const plan_head *)blob;
    /* The layout must be the plan's, byte for byte; then the table must fit before the
     * metadata, and every block must be valid. */
    const uint64_t table_end = h->table_offset + FRAME_TABLE_ENTRY_SIZE * n_columns;
    if (h->n_columns != n_columns || h->layout_len != layout_len
        || (uint64_t)PyBytes_GET_SIZE(layout) != layout_len || table_end > rq->meta_off
        || bytes_differ(s + FRAME_PREAMBLE_SIZE, PyBytes_AS_STRING(layout), (size_t)layout_len)) {
        return 0;
    }
    const char *table = s + h->table_offset;
    PyObject *memo = ((Plan *)entry)->memo;
    rq->blob = blob;
    rq->h = h;
    rq->s = s;
    rq->n = n;
    rq->out_meta = memo != NULL ? memo_lookup(PyBytes_AS_STRING(memo), table, rq) : 0;
    if (rq->out_meta != 0) {
        rq->memo_obj = Py_NewRef(memo);
        rq->memo = PyBytes_AS_STRING(memo);
        rq->table = MEMO_TABLE(rq->memo); /* the same bytes, in memory nothing else writes */
    }
    else {
        const size_t table_len = (size_t)(FRAME_TABLE_ENTRY_SIZE * n_columns);
        if ((rq->table_own = PyMem_Malloc(table_len ? table_len : 1)) == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(rq->table_own, table, table_len);
        rq->table = rq->table_own;
        rq->out_meta = check_blocks(rq->table, blob, rq->n_cand, table_end, rq->meta_off);
        if (rq->out_meta == 0) {
            return 0;
        }
    }
    if (check_ragged && ragged_bad(rq, (const col_desc *)(blob + h->cols_at),
                                   (const uint32_t *)(blob + h->kept_at))) {
        return 0;
    }
    if (rq->memo == NULL && h->n_ragged == 0 /* ragged lengths change tables: no memo */
        && memo_store((Plan *)entry, rq) < 0) {
        return -1;
    }
    Py_INCREF(entry); /* the cache may drop it while the GIL is released */
    rq->entry = entry;
    return 1;
}

/* What read_request holds for a request: its plan entry, memo and private table copy. */
static void
request_release(request *rq)
{
    Py_CLEAR(rq->entry);
    Py_CLEAR(rq->memo_obj);
    PyMem_Free(rq->table_own);
    rq->table_own = NULL;
}

/* Write the output header (header_len bytes at d: the plan's prefix, this request's
 * n_candidates and tail fields, the canonical block table of the kept blocks, padding) and
 * the coalesced runs into runs[] as (source offset, length) pairs, in output order (they
 * tile the output from header_len); return how many.  Consecutive kept blocks that are
 * contiguous in the input (each with its padding to BLOCK_ALIGN) are one run, and no
 * padding follows the last kept block.  Branch-free per block: which blocks coalesce
 * follows the allowlist's random pattern, and a mispredicted branch per block would cost
 * more than the arithmetic. */
static uint64_t
build_output(char *d, const request *rq, uint64_t *runs)
{
    const plan_head *h = rq->h;
    const uint32_t *kept = (const uint32_t *)(rq->blob + h->kept_at);
    memcpy(d, rq->blob + h->prefix_at, (size_t)h->out_table_offset);
    store_le(d + FRAME_N_CANDIDATES_AT, rq->n_cand, FRAME_N_CANDIDATES_SIZE);
    store_tail(d, rq->out_meta + rq->meta_len, rq->out_meta, rq->meta_len);
    char *ot = d + h->out_table_offset;
    uint64_t cur = h->header_len, expect = UINT64_MAX, r = (uint64_t)-1;
    uint64_t run_src = 0, run_dst = 0;
    for (uint64_t j = 0; j < h->n_kept; j++) {
        const uint64_t off = TABLE_OFF(rq->table, kept[j]), nb = TABLE_NB(rq->table, kept[j]);
        const uint64_t padded = align_up(nb, FRAME_BLOCK_ALIGN);
        char *entry = ot + FRAME_TABLE_ENTRY_SIZE * j;
        store_le(entry + FRAME_TABLE_OFFSET_AT, cur, FRAME_TABLE_OFFSET_SIZE);
        store_le(entry + FRAME_TABLE_NBYTES_AT, nb, FRAME_TABLE_NBYTES_SIZE);
        const uint64_t fresh = off != expect; /* blocks are aligned: never UINT64_MAX */
        r += fresh;
        run_src = fresh ? off : run_src;
        run_dst = fresh ? cur : run_dst;
        runs[2 * r] = run_src;
        runs[2 * r + 1] = cur + padded - run_dst;
        expect = off + padded;
        cur += padded;
    }
    char *pad = ot + FRAME_TABLE_ENTRY_SIZE * h->n_kept;
    memset(pad, 0, (size_t)(d + h->header_len - pad));
    if (h->n_kept == 0) {
        return 0;
    }
    runs[2 * r + 1] = rq->out_meta - run_dst; /* the last run: no padding after it */
    return r + 1;
}

/* Build a new memo from this request's (validated) table, header and runs, make it the
 * plan's and the request's; -1 on MemoryError. */
static int
memo_store(Plan *plan, request *rq)
{
    PyObject *obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)memo_bytes(rq->h));
    if (obj == NULL) {
        return -1;
    }
    char *memo = PyBytes_AS_STRING(obj);
    memo_head m = {1, rq->n_cand, rq->meta_off, rq->out_meta, 0};
    memcpy(MEMO_TABLE(memo), rq->table, (size_t)(FRAME_TABLE_ENTRY_SIZE * rq->h->n_columns));
    m.n_runs = build_output(MEMO_HEADER(memo, rq->h), rq, MEMO_RUNS(memo, rq->h));
    memcpy(memo, &m, sizeof m);
    Py_XSETREF(plan->memo, Py_NewRef(obj));
    rq->memo_obj = obj;
    rq->memo = memo;
    rq->table = MEMO_TABLE(memo);
    return 0;
}

/* The output header and runs of one request: from the plan's memo (a hit) or built into
 * the caller's scratch. */
typedef struct {
    const uint64_t *runs;
    uint64_t n_runs;
} run_list;

static run_list
output_runs(char *d, const request *rq, uint64_t *scratch)
{
    if (rq->memo != NULL) { /* same n_candidates and table: only the tail can differ */
        memcpy(d, MEMO_HEADER(rq->memo, rq->h), (size_t)rq->h->header_len);
        store_tail(d, rq->out_meta + rq->meta_len, rq->out_meta, rq->meta_len);
        return (run_list){MEMO_RUNS(rq->memo, rq->h), ((const memo_head *)rq->memo)->n_runs};
    }
    return (run_list){scratch, build_output(d, rq, scratch)};
}

/* Copy the runs from the input to d, first run first or last run first, prefetching the
 * first lines of the run PREFETCH_AHEAD runs ahead (each run starts a new source stream,
 * which the hardware prefetchers pick up only after a few misses).
 *
 * plan_trim alternates the two orders from call to call.  When consecutive trims read the
 * same frame (a fan-out to several targets, or a benchmark's steady state) and the frame
 * plus the output outgrow the L2 cache, a copy in one fixed order always finds its next
 * bytes evicted (the access pattern is cyclic); alternating the order starts each copy
 * where the previous one ended, in what is still cached (~10% on the dev VM, 2 MB L2). */
#define COPY_LIST_BODY(COPY)                                                               \
    const char *s = rq->s;                                                                 \
    if (!backwards) {                                                                      \
        char *at = d + rq->h->header_len;                                                  \
        for (uint64_t i = 0; i < n_runs; i++) {                                            \
            if (i + PREFETCH_AHEAD < n_runs) {                                             \
                for (int k = 0; k < PREFETCH_LINES; k++) {                                 \
                    PREFETCH(s + runs[2 * (i + PREFETCH_AHEAD)] + 64 * k);                 \
                }                                                                          \
            }                                                                              \
            COPY(at, s + runs[2 * i], (size_t)runs[2 * i + 1]);                            \
            at += runs[2 * i + 1];                                                         \
        }                                                                                  \
        return;                                                                            \
    }                                                                                      \
    char *end = d + rq->out_meta;                                                          \
    for (uint64_t i = n_runs; i-- > 0;) {                                                  \
        if (i >= PREFETCH_AHEAD) {                                                         \
            for (int k = 0; k < PREFETCH_LINES; k++) {                                     \
                PREFETCH(s + runs[2 * (i - PREFETCH_AHEAD)] + 64 * k);                     \
            }                                                                              \
        }                                                                                  \
        end -= runs[2 * i + 1];                                                            \
        COPY(end, s + runs[2 * i], (size_t)runs[2 * i + 1]);                               \
    }

static void
copy_list_any(char *d, const request *rq, const uint64_t *runs, uint64_t n_runs,
              int backwards)
{
    COPY_LIST_BODY(copy_run)
}

#ifdef HAVE_X86_KERNELS
#define COPY_AVX2(dst, src, n) \
    ((n) >= 64 ? copy_avx2((dst), (src), (n)) : (void)memcpy((dst), (src), (n)))

/* The same with the AVX2 kernel inlined: a few-candidate frame's runs are 64-byte
 * blocks, where a call per run costs as much as its copy. */
__attribute__((target("avx2"))) static void
copy_list_avx2(char *d, const request *rq, const uint64_t *runs, uint64_t n_runs,
               int backwards)
{
    COPY_LIST_BODY(COPY_AVX2)
}
#endif

static void
copy_list(char *d, const request *rq, const uint64_t *runs, uint64_t n_runs, int backwards)
{
#ifdef HAVE_X86_KERNELS
    if (kernel == KERNEL_AVX2) {
        copy_list_avx2(d, rq, runs, n_runs, backwards);
        return;
    }
#endif
    copy_list_any(d, rq, runs, n_runs, backwards);
}

/* Which order the next plan_trim copies in; read and flipped only while holding the GIL. */
static int copy_backwards = 0;

/* Scratch for the runs of one request: on the stack for up to SCRATCH_RUNS runs. */
#define SCRATCH_RUNS 512
typedef struct {
    uint64_t local[2 * SCRATCH_RUNS];
    uint64_t *runs;
} scratch;

static int
scratch_init(scratch *sc, const request *rq)
{
    sc->runs = sc->local;
    if (rq->memo == NULL && rq->h->n_kept > SCRATCH_RUNS) {
        sc->runs = PyMem_Malloc((size_t)(16 * rq->h->n_kept));
        if (sc->runs == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static void
scratch_free(scratch *sc)
{
    if (sc->runs != sc->local) {
        PyMem_Free(sc->runs);
    }
}

/* Write the whole trimmed frame (out_meta + meta_len bytes) to d; -1 on MemoryError. */
static int
write_trimmed(char *d, const request *rq)
{
    scratch sc;
    if (scratch_init(&sc, rq) < 0) {
        return -1;
    }
    run_list rl = output_runs(d, rq, sc.runs);
    int backwards = copy_backwards;
    copy_backwards = !backwards;
    if (rq->out_meta - rq->h->header_len >= RELEASE_GIL_MIN_BYTES) {
        /* src, out, the plan entry and the memo are all held (and a memo never changes):
         * nothing moves or goes away. */
        Py_BEGIN_ALLOW_THREADS
        copy_list(d, rq, rl.runs, rl.n_runs, backwards);
        Py_END_ALLOW_THREADS
    }
    else {
        copy_list(d, rq, rl.runs, rl.n_runs, backwards);
    }
    memcpy(d + rq->out_meta, rq->s + rq->meta_off, (size_t)rq->meta_len);
    scratch_free(&sc);
    return 0;
}

static int
check_call(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
           Py_ssize_t type_at)
{
    if (nargs != want || !PyDict_Check(args[0]) || !PyType_Check(args[type_at])
        || !PyType_IsSubtype((PyTypeObject *)args[type_at], &PyTuple_Type)) {
        PyErr_Format(PyExc_TypeError, "%s: bad arguments (see the module docstring)", name);
        return -1;
    }
    return 0;
}

/* A writable, 1-D, C-contiguous unsigned-byte memoryview of out_obj (a new reference);
 * NULL without an exception when out_obj does not qualify. */
static PyObject *
out_view(PyObject *out_obj)
{
    PyObject *data;
    if (!PyObject_CheckBuffer(out_obj) || (data = PyMemoryView_FromObject(out_obj)) == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_buffer *view = PyMemoryView_GET_BUFFER(data);
    if (view->readonly || view->ndim != 1
        || (view->format != NULL && strcmp(view->format, "B") != 0)
        || !PyBuffer_IsContiguous(view, 'C')) {
        Py_DECREF(data);
        return NULL;
    }
    return data;
}

/* Shorten data, a new, not yet shared 1-D byte view from out_view, to exactly len bytes in
 * place (what slicing it would set up in a second memoryview; its managed buffer keeps the
 * full export); -1 if it is shorter than len. */
static int
fit_view(PyObject *data, uint64_t len)
{
    Py_buffer *view = PyMemoryView_GET_BUFFER(data);
    if ((uint64_t)view->len < len) {
        return -1;
    }
    view->len = (Py_ssize_t)len;
    view->shape[0] = (Py_ssize_t)len;
    return 0;
}

/* A writable, 1-D, C-contiguous unsigned-byte memoryview of out with exactly len bytes
 * (a new bytearray for None); NULL without an exception when out does not qualify. */
static PyObject *
output_view(PyObject *out_obj, uint64_t len)
{
    if (out_obj == Py_None) {
        PyObject *fresh = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)len);
        if (fresh == NULL) {
            return NULL;
        }
        PyObject *data = PyMemoryView_FromObject(fresh);
        Py_DECREF(fresh);
        return data;
    }
    PyObject *data = out_view(out_obj);
    if (data != NULL && fit_view(data, len) < 0) {
        Py_CLEAR(data);
    }
    return data;
}

/* One trim through the plan cache: a new reference to the result, a new reference to
 * None when the general path must serve it (nothing written), NULL with an exception.
 *
 * An out that shares memory with src (out=buf: a trim in place; or any overlapping view)
 * gets exactly the bytes a separate out would: the input is first copied whole, and the
 * request is validated and served from that copy (memmove semantics for the whole trim). */
static PyObject *
trim_request(PyObject *cache, PyObject *src_obj, PyObject *out_obj, PyObject *digest_obj,
             int check_ragged, PyTypeObject *result_type, plan_slot *slot)
{
    Py_buffer src;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* the general path words the error */
        Py_RETURN_NONE;
    }
    request rq = {0};
    PyObject *result = NULL, *data = NULL, *snapshot = NULL;
    Py_buffer in = src; /* what the request reads: src, or its snapshot (buf and len only) */
    if (out_obj != Py_None) {
        if ((data = out_view(out_obj)) == NULL) {
            result = Py_NewRef(Py_None); /* the general path words the error */
            goto done;
        }
        const Py_buffer *ov = PyMemoryView_GET_BUFFER(data);
        if (ranges_overlap(ov->buf, ov->len, src.buf, src.len)) {
            if ((snapshot = PyBytes_FromStringAndSize(src.buf, src.len)) == NULL) {
                goto done;
            }
            in.buf = PyBytes_AS_STRING(snapshot);
        }
    }
    int ok = read_request(cache, &in, digest_obj, check_ragged, &rq, slot);
    if (ok <= 0) {
        result = ok < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    const uint64_t out_len = rq.out_meta + rq.meta_len;
    if (data == NULL) {
        data = output_view(Py_None, out_len);
        if (data == NULL) {
            goto done;
        }
    }
    else if (fit_view(data, out_len) < 0) {
        result = Py_NewRef(Py_None); /* too small: the general path words the error */
        goto done;
    }
    if (write_trimmed((char *)PyMemoryView_GET_BUFFER(data)->buf, &rq) == 0) {
        result = make_result(result_type, data, src.len, (Py_ssize_t)out_len, rq.h->n_kept,
                             rq.h->n_missing);
    }
done:
    Py_XDECREF(data);
    Py_XDECREF(snapshot);
    request_release(&rq);
    PyBuffer_Release(&src);
    return result;
}

static PyObject *
plan_trim(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (check_call("plan_trim", args, nargs, 6, 5) < 0) {
        return NULL;
    }
    int check_ragged = PyObject_IsTrue(args[4]);
    if (check_ragged < 0) {
        return NULL;
    }
    return trim_request(args[0], args[1], args[2], args[3], check_ragged,
                        (PyTypeObject *)args[5], NULL);
}

/* ---- TrimEntry: Trimmer.trim as one C call ------------------------------------------------
 *
 * trim_entry(cache, result_type, general, full) -> TrimEntry, a callable with the signature
 * of Trimmer.trim, (buf, allowlist, out=None, check_ragged=False), that the Trimmer stores
 * as its instance's "trim".  A call reads allowlist.digest and runs plan_trim's request
 * with no Python frame, no argument tuple and no keyword dict, reusing its last plan (see
 * plan_slot); when that declines it returns general(buf, allowlist, out, check_ragged),
 * and any call it cannot parse (other keywords, a wrong count) goes to full(*args,
 * **kwargs), the documented method, which words the TypeError. */
typedef struct {
    PyObject_HEAD
    PyObject *cache, *result_type, *general, *full;
    vectorcallfunc vectorcall;
    plan_slot last;
} TrimEntry;

static PyObject *str_digest, *str_out, *str_check_ragged; /* interned at import */

static int
entry_traverse(TrimEntry *self, visitproc visit, void *arg)
{
    Py_VISIT(self->cache);
    Py_VISIT(self->result_type);
    Py_VISIT(self->general);
    Py_VISIT(self->full);
    Py_VISIT(self->last.entry);
    return 0;
}

static int
entry_clear(TrimEntry *self)
{
    Py_CLEAR(self->cache);
    Py_CLEAR(self->result_type);
    Py_CLEAR(self->general);
    Py_CLEAR(self->full);
    Py_CLEAR(self->last.entry);
    return 0;
}

static void
entry_dealloc(TrimEntry *self)
{
    PyObject_GC_UnTrack(self);
    entry_clear(self);
    PyObject_GC_Del(self);
}

/* 1 and the keyword's value slot for a known keyword name, 0 for any other. */
static int
entry_keyword(PyObject *name, PyObject **out, PyObject **check, PyObject ***slot)
{
    if (name == str_out || (PyUnicode_Check(name) && PyUnicode_Compare(name, str_out) == 0)) {
        *slot = out;
        return 1;
    }
    if (name == str_check_ragged
        || (PyUnicode_Check(name) && PyUnicode_Compare(name, str_check_ragged) == 0)) {
        *slot = check;
        return 1;
    }
    return 0;
}

static PyObject *
entry_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TrimEntry *self = (TrimEntry *)callable;
    const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    const Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *out = Py_None, *check = Py_False;
    if (nargs < 2 || nargs > 4) {
        return PyObject_Vectorcall(self->full, args, nargsf, kwnames);
    }
    if (nargs > 2) {
        out = args[2];
    }
    if (nargs > 3) {
        check = args[3];
    }
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject **slot = NULL;
        if (!entry_keyword(PyTuple_GET_ITEM(kwnames, k), &out, &check, &slot)
            || (slot == &out && nargs > 2) || (slot == &check && nargs > 3)) {
            return PyObject_Vectorcall(self->full, args, nargsf, kwnames); /* TypeError */
        }
        *slot = args[nargs + k];
    }
    int check_ragged = PyObject_IsTrue(check);
    if (check_ragged < 0) {
        return NULL;
    }
    PyObject *digest = PyObject_GetAttr(args[1], str_digest);
    PyObject *res = NULL;
    if (digest == NULL) {
        PyErr_Clear(); /* not an Allowlist: the general path says so */
        res = Py_NewRef(Py_None);
    }
    else {
        res = trim_request(self->cache, args[0], out, digest, check_ragged,
                           (PyTypeObject *)self->result_type, &self->last);
        Py_DECREF(digest);
    }
    if (res != Py_None) {
        return res;
    }
    Py_DECREF(res);
    PyObject *call[4] = {args[0], args[1], out, check_ragged ? Py_True : Py_False};
    return PyObject_Vectorcall(self->general, call, 4, NULL);
}

static PyObject *
entry_forget(TrimEntry *self, PyObject *unused)
{
    (void)unused;
    Py_CLEAR(self->last.entry);
    Py_RETURN_NONE;
}

static PyMethodDef entry_methods[] = {
    {"forget", (PyCFunction)entry_forget, METH_NOARGS,
     "forget(): drop the last plan (Trimmer.clear calls it)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TrimEntryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "root_worker.frame._copyruns.TrimEntry",
    .tp_basicsize = sizeof(TrimEntry),
    .tp_dealloc = (destructor)entry_dealloc,
    .tp_vectorcall_offset = offsetof(TrimEntry, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_traverse = (traverseproc)entry_traverse,
    .tp_clear = (inquiry)entry_clear,
    .tp_methods = entry_methods,
    .tp_doc = "trim(buf, allowlist, out=None, check_ragged=False) -> TrimResult: "
              "Trimmer.trim in one C call (see Trimmer.trim).",
};

static PyObject *
trim_entry(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4 || !PyDict_Check(args[0]) || !PyType_Check(args[1])
        || !PyType_IsSubtype((PyTypeObject *)args[1], &PyTuple_Type)
        || !PyCallable_Check(args[2]) || !PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "trim_entry(cache: dict, result_type, general, full): bad arguments");
        return NULL;
    }
    TrimEntry *e = PyObject_GC_New(TrimEntry, &TrimEntryType);
    if (e == NULL) {
        return NULL;
    }
    e->cache = Py_NewRef(args[0]);
    e->result_type = Py_NewRef(args[1]);
    e->general = Py_NewRef(args[2]);
    e->full = Py_NewRef(args[3]);
    e->vectorcall = entry_call;
    e->last.entry = NULL;
    PyObject_GC_Track(e);
    return (PyObject *)e;
}
