/*
 * root_worker.frame._copyruns: the byte-moving primitives of the frame trim engine.
 *
 * Optional accelerator: root_worker/frame/backends.py has a pure numpy/Python fallback with the
 * same semantics, and the tests run both.  Everything is bounds-checked before the first
 * byte moves, so bad arguments raise ValueError and never touch memory out of range.  The
 * frame layout constants come from _frame_layout.h, generated from format.py (no layout
 * offset is spelled here).
 *
 * Aliasing: any argument may share memory with any other.  Runs are read once into private
 * memory before they are checked; copies between buffers that overlap are memmoves, in the
 * documented order; plan_trim reads an input that shares memory with out from a copy taken
 * first; plans are opaque objects only make_plan creates.  The sanitized build and fuzzer
 * in fuzz/engine/ check all of this under AddressSanitizer and UBSan.
 *
 * One translation unit in parts: this file (the module, copy_runs, write_frame,
 * same_bytes, set_kernel) includes, in order, _copyruns_kernels.h (copy and compare
 * kernels, byte-order helpers), _copyruns_plan.h (Plan objects, the block-table and
 * ragged checks, the memo), _copyruns_request.h (one request: plan_trim) and
 * _copyruns_parts.h (the scatter-gather result: Span, plan_parts).
 *
 *   copy_runs(dst, src, runs) -> int
 *       dst: writable contiguous buffer; src: contiguous buffer; runs: contiguous int64
 *       buffer of n*3 values (src_offset, dst_offset, length).  Copies every run (with the
 *       kernel below) and returns the total number of bytes copied.  The GIL is released
 *       when the total is large (copying is then pure memory traffic).  runs is read once,
 *       before any byte moves; if src and dst share memory each run is a memmove, in order
 *       (what slice assignments between views of one buffer do, run by run).
 *
 *   set_kernel(name) -> name
 *       Switches to another copy kernel the CPU supports (tests and benchmarks); KERNEL is
 *       the one chosen at import.
 *
 *   write_frame(dst, src, header, runs, meta_offset, meta_len, out_meta_offset) -> int
 *       The whole output step of one trim from a Python-built plan: dst[:len(header)] =
 *       header; patch the three per-request preamble fields (frame_len, meta_offset,
 *       meta_len); copy_runs(dst, src, runs); copy the metadata src[meta_offset:+meta_len]
 *       to dst[out_meta_offset:].  Returns the output length.  Those four steps happen in
 *       that order, each as memmove, whatever shares memory with dst (header, runs, src):
 *       the result is that of trim._write_frame_py.
 *
 *   same_bytes(buf, offset, expected) -> bool
 *       True if buf[offset:offset + len(expected)] == expected (memcmp, no temporary
 *       copy); False if that range is not inside buf.
 *
 *   make_plan(layout, n_columns, elem, ragged, kept, prefix, n_missing) -> Plan
 *       The plan of one (layout, allowlist) for plan_trim, as an opaque Plan object (no
 *       attributes, no buffer, no other constructor): layout (bytes, the layout section),
 *       elem (uint64 per column: element bytes, 1 .. MAX_ELEM_BYTES), ragged (uint8 per
 *       column, 0 or 1), kept (int64, increasing column indices), prefix (the output
 *       preamble with the kept n_columns, layout_len and layout_hint, the kept layout
 *       section and its padding: out_table_offset bytes).  ValueError if inconsistent.
 *
 *   plan_trim(cache, src, out, digest, check_ragged, result_type) -> result | None
 *       The trimmer's whole request in one call, for ANY valid block table.  Checks src's
 *       preamble as read_preamble does, looks up cache[key] with key = 16 bytes
 *       "<QQ"(layout_hint, digest), an entry being a Plan (anything else: TypeError);
 *       compares the layout bytes; validates every block of the block table as
 *       check_table does (alignment, order, overlap, bounds, exact sizes); if check_ragged,
 *       the offsets head of every kept ragged block (offsets[0] == 0, non-decreasing,
 *       offsets[C] == n_values); computes the canonical output table and the coalesced
 *       runs; writes the output into out (a writable 1-D unsigned-byte buffer, or None for
 *       a new bytearray; out may share memory with src, the input is then copied first)
 *       and returns result_type(memoryview of the output, len(src),
 *       output length, n_kept, n_missing).  Returns None, having written nothing, whenever
 *       there is no plan or anything is invalid or does not fit: the caller's general path
 *       then serves the request or words the error.  Nothing is trusted from an earlier
 *       request.
 *
 *   trim_entry(cache, result_type, general, full) -> TrimEntry
 *       A callable with Trimmer.trim's signature, (buf, allowlist, out=None,
 *       check_ragged=False), that the Trimmer installs as its instance's trim: it reads
 *       allowlist.digest and runs plan_trim's request in C (keeping its last plan by key),
 *       returns general(buf, allowlist, out, check_ragged) when that declines and
 *       full(*args, **kwargs) for a call it cannot parse.  forget() drops the last plan.
 *
 *   plan_parts(cache, src, digest, check_ragged, max_parts, result_type) -> result | None
 *       As plan_trim, but returns result_type(parts, ...) where parts is a list: the output
 *       header (new bytes), one memoryview of src per coalesced run (each kept block with
 *       its padding, none after the last), a memoryview of src's metadata.  Their
 *       concatenation is the plan_trim output.  The views share src (valid while it is).
 *       When the list would exceed max_parts, parts is instead [memoryview of one new
 *       contiguous copy].  src must be 1-D unsigned bytes (None otherwise).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_frame_layout.h" /* generated from format.py: python -m root_worker.frame.cheader */

#include "_copyruns_kernels.h"

static PyObject *
set_kernel(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (name == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "set_kernel(name: str)");
        }
        return NULL;
    }
    for (int k = 0; k <= best_kernel; k++) {
        /* movsb needs ERMS, which every AVX2 CPU we pick a vector kernel for has */
        if (strcmp(name, kernel_names[k]) == 0) {
            kernel = k;
            return PyUnicode_FromString(kernel_names[kernel]);
        }
    }
    PyErr_Format(PyExc_ValueError, "copy kernel %R is unknown or not supported here "
                 "(best: %s)", arg, kernel_names[best_kernel]);
    return NULL;
}

/* Below this many bytes, releasing and re-acquiring the GIL costs more than it frees. */
#define RELEASE_GIL_MIN_BYTES (256 * 1024)
/* The per-request preamble fields the trimmer patches: frame_len, meta_offset, meta_len. */
#define FRAME_TAIL_END (FRAME_META_LEN_AT + FRAME_META_LEN_SIZE)

static int
check_runs(const int64_t *r, Py_ssize_t n_runs, Py_ssize_t src_len, Py_ssize_t dst_len,
           int64_t *total)
{
    int64_t sum = 0;
    for (Py_ssize_t i = 0; i < n_runs; i++) {
        int64_t s = r[3 * i], d = r[3 * i + 1], len = r[3 * i + 2];
        if (s < 0 || d < 0 || len < 0 || s > (int64_t)src_len || d > (int64_t)dst_len
            || len > (int64_t)src_len - s || len > (int64_t)dst_len - d) {
            PyErr_Format(PyExc_ValueError,
                         "run %zd (src %lld, dst %lld, len %lld) is outside the buffers "
                         "(src %zd bytes, dst %zd bytes)",
                         i, (long long)s, (long long)d, (long long)len, src_len, dst_len);
            return -1;
        }
        sum += len;
    }
    *total = sum;
    return 0;
}

/* The caller's runs, read once into private memory (on the stack up to LOCAL_RUNS runs)
 * before they are checked: a runs buffer that is (a view of) dst, or that anything else
 * rewrites during the copy, cannot change a run after its check. */
#define LOCAL_RUNS 128
typedef struct {
    int64_t local[3 * LOCAL_RUNS];
    int64_t *r;
    Py_ssize_t n;
} runs_copy;

static int
take_runs(const Py_buffer *runs, runs_copy *rc)
{
    rc->r = rc->local;
    rc->n = 0;
    if (runs->len % (3 * (Py_ssize_t)sizeof(int64_t)) != 0) {
        PyErr_SetString(PyExc_ValueError, "runs must hold int64 triples (a multiple of 3 values)");
        return -1;
    }
    if (((uintptr_t)runs->buf) % sizeof(int64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "runs buffer of int64 triples must be 8-byte aligned");
        return -1;
    }
    rc->n = runs->len / (3 * (Py_ssize_t)sizeof(int64_t));
    if (rc->n > LOCAL_RUNS && (rc->r = PyMem_Malloc((size_t)runs->len)) == NULL) {
        rc->r = rc->local;
        PyErr_NoMemory();
        return -1;
    }
    memcpy(rc->r, runs->buf, (size_t)runs->len);
    return 0;
}

static void
free_runs(runs_copy *rc)
{
    if (rc->r != rc->local) {
        PyMem_Free(rc->r);
    }
}

/* Non-zero if the byte ranges [a, a + alen) and [b, b + blen) share a byte. */
static inline int
ranges_overlap(const void *a, Py_ssize_t alen, const void *b, Py_ssize_t blen)
{
    const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return alen > 0 && blen > 0 && x < y + (uintptr_t)blen && y < x + (uintptr_t)alen;
}

static void
copy_runs_loop(char *d, const char *s, const int64_t *r, Py_ssize_t n_runs)
{
    for (Py_ssize_t i = 0; i < n_runs; i++) {
        if (i + PREFETCH_AHEAD < n_runs) {
            const char *next = s + r[3 * (i + PREFETCH_AHEAD)];
            for (int k = 0; k < PREFETCH_LINES; k++) {
                PREFETCH(next + 64 * k);
            }
        }
        copy_run(d + r[3 * i + 1], s + r[3 * i], (size_t)r[3 * i + 2]);
    }
}

/* When src and dst share memory: each run in order, as memmove (what Python's slice
 * assignments between views of one buffer do, run by run). */
static void
move_runs_loop(char *d, const char *s, const int64_t *r, Py_ssize_t n_runs)
{
    for (Py_ssize_t i = 0; i < n_runs; i++) {
        memmove(d + r[3 * i + 1], s + r[3 * i], (size_t)r[3 * i + 2]);
    }
}

/* Copy checked runs; the GIL is released when there is enough memory traffic to share.
 * The buffers stay exported (Py_buffer held by the caller), so they cannot move. */
static void
copy_all_runs(char *d, Py_ssize_t d_len, const char *s, Py_ssize_t s_len, const int64_t *r,
              Py_ssize_t n_runs, int64_t total)
{
    const int overlap = ranges_overlap(d, d_len, s, s_len);
    if (total >= RELEASE_GIL_MIN_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        (overlap ? move_runs_loop : copy_runs_loop)(d, s, r, n_runs);
        Py_END_ALLOW_THREADS
    }
    else {
        (overlap ? move_runs_loop : copy_runs_loop)(d, s, r, n_runs);
    }
}

static PyObject *
copy_runs(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer dst, src, runs;
    runs_copy rc;
    int64_t total = 0;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "w*y*y*:copy_runs", &dst, &src, &runs)) {
        return NULL;
    }
    if (take_runs(&runs, &rc) < 0 || check_runs(rc.r, rc.n, src.len, dst.len, &total) < 0) {
        goto done;
    }
    copy_all_runs((char *)dst.buf, dst.len, (const char *)src.buf, src.len, rc.r, rc.n, total);
    result = PyLong_FromLongLong((long long)total);
done:
    free_runs(&rc);
    PyBuffer_Release(&runs);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *
write_frame(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer dst, src, header, runs;
    runs_copy rc;
    long long meta_off, meta_len, out_meta;
    int64_t total = 0;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "w*y*y*y*LLL:write_frame", &dst, &src, &header, &runs,
                          &meta_off, &meta_len, &out_meta)) {
        return NULL;
    }
    if (take_runs(&runs, &rc) < 0) {
        goto done;
    }
    if (header.len < FRAME_TAIL_END || header.len > dst.len || meta_off < 0 || meta_len < 0
        || out_meta < header.len || meta_off > src.len || meta_len > src.len - meta_off
        || out_meta > dst.len || meta_len > dst.len - out_meta) {
        PyErr_Format(PyExc_ValueError,
                     "write_frame: header (%zd bytes) or metadata (src %lld, dst %lld, len "
                     "%lld) is outside the buffers (src %zd bytes, dst %zd bytes)",
                     header.len, meta_off, out_meta, meta_len, src.len, dst.len);
        goto done;
    }
    if (check_runs(rc.r, rc.n, src.len, dst.len, &total) < 0) {
        goto done;
    }
    /* In order, each step as memmove when its buffers share memory: the header (which may
     * be a view of dst or src), the tail, the runs, the metadata -- exactly the steps of
     * trim._write_frame_py, whatever aliases what. */
    char *d = (char *)dst.buf;
    const char *s = (const char *)src.buf;
    memmove(d, header.buf, (size_t)header.len);
    store_tail(d, (uint64_t)(out_meta + meta_len), (uint64_t)out_meta, (uint64_t)meta_len);
    copy_all_runs(d, dst.len, s, src.len, rc.r, rc.n, total);
    memmove(d + out_meta, s + meta_off, (size_t)meta_len);
    result = PyLong_FromLongLong(out_meta + meta_len);
done:
    free_runs(&rc);
    PyBuffer_Release(&runs);
    PyBuffer_Release(&header);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *
same_bytes(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf, expected;
    Py_ssize_t offset;
    int equal = 0;

    if (!PyArg_ParseTuple(args, "y*ny*:same_bytes", &buf, &offset, &expected)) {
        return NULL;
    }
    if (offset >= 0 && offset <= buf.len && expected.len <= buf.len - offset) {
        equal = memcmp((const char *)buf.buf + offset, expected.buf, (size_t)expected.len) == 0;
    }
    PyBuffer_Release(&expected);
    PyBuffer_Release(&buf);
    return PyBool_FromLong(equal);
}

#include "_copyruns_plan.h"
#include "_copyruns_request.h"
#include "_copyruns_parts.h"

static PyMethodDef methods[] = {
    {"copy_runs", copy_runs, METH_VARARGS,
     "copy_runs(dst, src, runs) -> int: memcpy each (src_off, dst_off, len) int64 run."},
    {"write_frame", write_frame, METH_VARARGS,
     "write_frame(dst, src, header, runs, meta_offset, meta_len, out_meta_offset) -> int."},
    {"same_bytes", same_bytes, METH_VARARGS,
     "same_bytes(buf, offset, expected) -> bool: memcmp of a region against bytes."},
    {"set_kernel", set_kernel, METH_O,
     "set_kernel(name) -> name: use another supported copy kernel (tests, benchmarks)."},
    {"make_plan", make_plan, METH_VARARGS,
     "make_plan(layout, n_columns, elem, ragged, kept, prefix, n_missing) -> Plan: a checked, "
     "opaque plan for plan_trim / plan_parts."},
    {"plan_trim", (PyCFunction)(void (*)(void))plan_trim, METH_FASTCALL,
     "plan_trim(cache, src, out, digest, check_ragged, result_type) -> result or None."},
    {"trim_entry", (PyCFunction)(void (*)(void))trim_entry, METH_FASTCALL,
     "trim_entry(cache, result_type, general, full) -> TrimEntry: Trimmer.trim as a C "
     "callable (see _copyruns_request.h)."},
    {"plan_parts", (PyCFunction)(void (*)(void))plan_parts, METH_FASTCALL,
     "plan_parts(cache, src, digest, check_ragged, max_parts, result_type) -> result or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "root_worker.frame._copyruns",
    "Bounds-checked byte-run copy and the trim engine's one-call fast path (optional "
    "accelerator).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__copyruns(void)
{
    detect_cpu();
    if (PyType_Ready(&PinType) < 0 || PyType_Ready(&SpanType) < 0
        || PyType_Ready(&TrimEntryType) < 0 || PyType_Ready(&PlanType) < 0) {
        return NULL;
    }
    str_digest = PyUnicode_InternFromString("digest");
    str_out = PyUnicode_InternFromString("out");
    str_check_ragged = PyUnicode_InternFromString("check_ragged");
    if (str_digest == NULL || str_out == NULL || str_check_ragged == NULL) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddStringConstant(m, "KERNEL", kernel_names[kernel]) < 0
                      || PyModule_AddObjectRef(m, "Span", (PyObject *)&SpanType) < 0
                      || PyModule_AddObjectRef(m, "Plan", (PyObject *)&PlanType) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
