/*
 * root_worker.frame._copyruns: the byte-moving primitives of the frame trim engine.
 *
 * Optional accelerator: root_worker/frame/backends.py has a pure numpy/Python fallback with the
 * same semantics, and the tests run both.  Everything is bounds-checked before the first
 * byte moves, so bad arguments raise ValueError and never touch memory out of range.  The
 * frame layout constants come from _frame_layout.h, generated from format.py (no layout
 * offset is spelled here).
 *
 *   copy_runs(dst, src, runs) -> int
 *       dst: writable contiguous buffer; src: contiguous buffer; runs: contiguous int64
 *       buffer of n*3 values (src_offset, dst_offset, length).  Copies every run (with the
 *       kernel below) and returns the total number of bytes copied.  The GIL is released
 *       when the total is large (copying is then pure memory traffic).
 *
 *   set_kernel(name) -> name
 *       Switches to another copy kernel the CPU supports (tests and benchmarks); KERNEL is
 *       the one chosen at import.
 *
 *   write_frame(dst, src, header, runs, meta_offset, meta_len, out_meta_offset) -> int
 *       The whole output step of one trim from a Python-built plan: dst[:len(header)] =
 *       header; patch the three per-request preamble fields (frame_len, meta_offset,
 *       meta_len); copy_runs(dst, src, runs); copy the metadata src[meta_offset:+meta_len]
 *       to dst[out_meta_offset:].  Returns the output length.
 *
 *   same_bytes(buf, offset, expected) -> bool
 *       True if buf[offset:offset + len(expected)] == expected (memcmp, no temporary
 *       copy); False if that range is not inside buf.
 *
 *   pack_columns(n_columns, layout_len, elem, ragged, kept, prefix, n_missing) -> bytes
 *       Packs the plan of one (layout, allowlist) into an immutable blob for plan_trim:
 *       elem (uint64 per column: element bytes, 1 .. MAX_ELEM_BYTES), ragged (uint8 per
 *       column, 0 or 1), kept (int64, increasing column indices), prefix (the output
 *       preamble with the kept n_columns, layout_len and layout_hint, the kept layout
 *       section and its padding: out_table_offset bytes).  ValueError if inconsistent.
 *
 *   plan_trim(cache, src, out, digest, check_ragged, result_type) -> result | None
 *       The trimmer's whole request in one call, for ANY valid block table.  Checks src's
 *       preamble as read_preamble does, looks up cache[key] with key = 16 bytes
 *       "<QQ"(layout_hint, digest), an entry being (layout bytes, pack_columns blob);
 *       compares the layout bytes; validates every block of the block table as
 *       check_table does (alignment, order, overlap, bounds, exact sizes); if check_ragged,
 *       the offsets head of every kept ragged block (offsets[0] == 0, non-decreasing,
 *       offsets[C] == n_values); computes the canonical output table and the coalesced
 *       runs; writes the output into out (a writable 1-D unsigned-byte buffer, or None for
 *       a new bytearray) and returns result_type(memoryview of the output, len(src),
 *       output length, n_kept, n_missing).  Returns None, having written nothing, whenever
 *       there is no plan or anything is invalid or does not fit: the caller's general path
 *       then serves the request or words the error.  Nothing is trusted from an earlier
 *       request.
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_X86_KERNELS 1
#endif

/* The copy kernel, chosen once at import (exported as KERNEL; set_kernel switches):
 *
 *   "avx512"  64-byte vectors, destination-aligned stores, from unaligned loads; x86-64
 *             with AVX-512F and VBMI (Ice Lake, Zen 4 or later) enabled by the OS.  Only
 *             loads and stores are 512-bit ("light" instructions).
 *   "avx2"    the same with 32-byte vectors.
 *   "movsb"   rep movsb, on ERMS CPUs without AVX2.
 *   "memcpy"  everything else (and every non-x86 build).
 *
 * A trim copies a few hundred 1-6 KB runs from scattered, 64-byte aligned source offsets
 * into one contiguous output.  On the 2-core dev VM (Xeon, AVX-512, ERMS+FSRM), for the
 * benchmark's 491 runs with the buffers' real alignments (source 48, destination 16 mod
 * 64), relative to one memcpy of the same bytes: avx512 ~1.2x, avx2 ~1.25x, rep movsb or
 * glibc memcpy per run ~1.3x (the per-run startup of rep movsb with misaligned pointers).
 */
enum { KERNEL_MEMCPY, KERNEL_MOVSB, KERNEL_AVX2, KERNEL_AVX512 };
static int kernel = KERNEL_MEMCPY;
static int best_kernel = KERNEL_MEMCPY; /* the fastest this CPU supports */
static const char *const kernel_names[] = {"memcpy", "movsb", "avx2", "avx512"};

#ifdef HAVE_X86_KERNELS
/* n >= 64.  The first and last 64 bytes are stored unaligned (overlapping the body),
 * the body with aligned stores from unaligned loads. */
__attribute__((target("avx512f"))) static void
copy_avx512(char *d, const char *s, size_t n)
{
    __m512i first = _mm512_loadu_si512((const void *)s);
    __m512i last = _mm512_loadu_si512((const void *)(s + n - 64));
    size_t skip = 64 - ((uintptr_t)d & 63);
    char *dd = d + skip, *dend = d + n - 64;
    const char *ss = s + skip;
    while (dd + 128 <= dend) {
        __m512i a = _mm512_loadu_si512((const void *)ss);
        __m512i b = _mm512_loadu_si512((const void *)(ss + 64));
        _mm512_store_si512((void *)dd, a);
        _mm512_store_si512((void *)(dd + 64), b);
        dd += 128;
        ss += 128;
    }
    while (dd < dend) {
        _mm512_store_si512((void *)dd, _mm512_loadu_si512((const void *)ss));
        dd += 64;
        ss += 64;
    }
    _mm512_storeu_si512((void *)d, first);
    _mm512_storeu_si512((void *)(d + n - 64), last);
}

/* n >= 64; as copy_avx512 with pairs of 32-byte vectors. */
__attribute__((target("avx2"))) static void
copy_avx2(char *d, const char *s, size_t n)
{
    __m256i f0 = _mm256_loadu_si256((const __m256i *)s);
    __m256i f1 = _mm256_loadu_si256((const __m256i *)(s + 32));
    __m256i l0 = _mm256_loadu_si256((const __m256i *)(s + n - 64));
    __m256i l1 = _mm256_loadu_si256((const __m256i *)(s + n - 32));
    if (n <= 128) { /* small blocks (a few candidates): four overlapping stores */
        _mm256_storeu_si256((__m256i *)d, f0);
        _mm256_storeu_si256((__m256i *)(d + 32), f1);
        _mm256_storeu_si256((__m256i *)(d + n - 64), l0);
        _mm256_storeu_si256((__m256i *)(d + n - 32), l1);
        return;
    }
    size_t skip = 32 - ((uintptr_t)d & 31);
    char *dd = d + skip, *dend = d + n - 64;
    const char *ss = s + skip;
    while (dd + 128 <= dend) {
        __m256i a = _mm256_loadu_si256((const __m256i *)ss);
        __m256i b = _mm256_loadu_si256((const __m256i *)(ss + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(ss + 64));
        __m256i e = _mm256_loadu_si256((const __m256i *)(ss + 96));
        _mm256_store_si256((__m256i *)dd, a);
        _mm256_store_si256((__m256i *)(dd + 32), b);
        _mm256_store_si256((__m256i *)(dd + 64), c);
        _mm256_store_si256((__m256i *)(dd + 96), e);
        dd += 128;
        ss += 128;
    }
    /* The rest of the body, [dd, dend), is under 128 bytes: four stores at dd + 32k, each
     * clamped into [d, d + n - 32] (a duplicate store of the same bytes past the end),
     * instead of a loop of 0..3 rounds whose exit the branch predictor cannot know when run
     * lengths vary from request to request. */
    const size_t last_at = n - 32;
    for (int k = 0; k < 4; k++) {
        size_t at = (size_t)(dd - d) + 32 * (size_t)k;
        at = at < last_at ? at : last_at;
        _mm256_storeu_si256((__m256i *)(d + at), _mm256_loadu_si256((const __m256i *)(s + at)));
    }
    (void)ss;
    _mm256_storeu_si256((__m256i *)d, f0);
    _mm256_storeu_si256((__m256i *)(d + 32), f1);
    _mm256_storeu_si256((__m256i *)(d + n - 64), l0);
    _mm256_storeu_si256((__m256i *)(d + n - 32), l1);
}
#endif

static inline void
copy_run(char *dst, const char *src, size_t n)
{
#ifdef HAVE_X86_KERNELS
    if (n >= 64) {
        if (kernel == KERNEL_AVX512) {
            copy_avx512(dst, src, n);
            return;
        }
        if (kernel == KERNEL_AVX2) {
            copy_avx2(dst, src, n);
            return;
        }
    }
    if (kernel == KERNEL_MOVSB) {
        __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
        return;
    }
#endif
    memcpy(dst, src, n);
}

static void
detect_cpu(void)
{
#ifdef HAVE_X86_KERNELS
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    unsigned int max_leaf = __get_cpuid_max(0, NULL);
    if (max_leaf < 7 || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) {
        return;
    }
    int osxsave = (ecx >> 27) & 1, avx = (ecx >> 28) & 1;
    unsigned long long xcr0 = 0;
    if (osxsave) {
        unsigned int lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        xcr0 = ((unsigned long long)hi << 32) | lo;
    }
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    int erms = (ebx >> 9) & 1, avx2 = (ebx >> 5) & 1, avx512f = (ebx >> 16) & 1;
    int avx512vbmi = (ecx >> 1) & 1;
    int os_ymm = (xcr0 & 0x6) == 0x6, os_zmm = (xcr0 & 0xE6) == 0xE6;
    /* AVX-512 only from the generations with VBMI (Ice Lake and later, Zen 4): on Skylake-SP
     * and Cascade Lake even 512-bit loads and stores lower the core's clock for a while,
     * which would tax everything else the worker runs. */
    if (avx && avx512f && avx512vbmi && os_zmm) {
        kernel = KERNEL_AVX512;
    }
    else if (avx && avx2 && os_ymm) {
        kernel = KERNEL_AVX2;
    }
    else if (erms) {
        kernel = KERNEL_MOVSB;
    }
#endif
    best_kernel = kernel;
}

static PyObject *
set_kernel(PyObject *self, PyObject *arg)
{
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

/* Software prefetch of the first lines of the run PREFETCH_AHEAD runs ahead: each run
 * starts a new source stream, which the hardware prefetchers pick up only after a few
 * misses. */
#define PREFETCH_AHEAD 2
#define PREFETCH_LINES 4
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define PREFETCH(p) ((void)(p))
#endif

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

/* Copy checked runs; the GIL is released when there is enough memory traffic to share.
 * The buffers stay exported (Py_buffer held by the caller), so they cannot move. */
static void
copy_all_runs(char *d, const char *s, const int64_t *r, Py_ssize_t n_runs, int64_t total)
{
    if (total >= RELEASE_GIL_MIN_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        copy_runs_loop(d, s, r, n_runs);
        Py_END_ALLOW_THREADS
    }
    else {
        copy_runs_loop(d, s, r, n_runs);
    }
}

static PyObject *
copy_runs(PyObject *self, PyObject *args)
{
    Py_buffer dst, src, runs;
    int64_t total = 0;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "w*y*y*:copy_runs", &dst, &src, &runs)) {
        return NULL;
    }
    if (runs.len % (3 * (Py_ssize_t)sizeof(int64_t)) != 0) {
        PyErr_SetString(PyExc_ValueError, "runs must hold a multiple of 3 int64 values");
        goto done;
    }
    Py_ssize_t n_runs = runs.len / (3 * (Py_ssize_t)sizeof(int64_t));
    const int64_t *r = (const int64_t *)runs.buf;
    if (((uintptr_t)r) % sizeof(int64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "runs buffer must be 8-byte aligned");
        goto done;
    }
    if (check_runs(r, n_runs, src.len, dst.len, &total) < 0) {
        goto done;
    }
    char *d = (char *)dst.buf;
    const char *s = (const char *)src.buf;
    copy_all_runs(d, s, r, n_runs, total);
    result = PyLong_FromLongLong((long long)total);
done:
    PyBuffer_Release(&runs);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

/* Little-endian stores (the wire format is LE whatever the host). */
static inline void
store_le(char *p, uint64_t v, int n)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(p, &v, (size_t)n); /* one store, not n byte stores */
#else
    for (int i = 0; i < n; i++) {
        p[i] = (char)(v >> (8 * i));
    }
#endif
}

static inline void
store_tail(char *d, uint64_t frame_len, uint64_t meta_offset, uint64_t meta_len)
{
    store_le(d + FRAME_FRAME_LEN_AT, frame_len, FRAME_FRAME_LEN_SIZE);
    store_le(d + FRAME_META_OFFSET_AT, meta_offset, FRAME_META_OFFSET_SIZE);
    store_le(d + FRAME_META_LEN_AT, meta_len, FRAME_META_LEN_SIZE);
}

static PyObject *
write_frame(PyObject *self, PyObject *args)
{
    Py_buffer dst, src, header, runs;
    long long meta_off, meta_len, out_meta;
    int64_t total = 0;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "w*y*y*y*LLL:write_frame", &dst, &src, &header, &runs,
                          &meta_off, &meta_len, &out_meta)) {
        return NULL;
    }
    Py_ssize_t n_runs = runs.len / (3 * (Py_ssize_t)sizeof(int64_t));
    const int64_t *r = (const int64_t *)runs.buf;
    if (runs.len % (3 * (Py_ssize_t)sizeof(int64_t)) != 0
        || ((uintptr_t)r) % sizeof(int64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "runs must be aligned int64 triples");
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
    if (check_runs(r, n_runs, src.len, dst.len, &total) < 0) {
        goto done;
    }
    char *d = (char *)dst.buf;
    const char *s = (const char *)src.buf;
    memcpy(d, header.buf, (size_t)header.len);
    store_tail(d, (uint64_t)(out_meta + meta_len), (uint64_t)out_meta, (uint64_t)meta_len);
    copy_all_runs(d, s, r, n_runs, total);
    memcpy(d + out_meta, s + meta_off, (size_t)meta_len);
    result = PyLong_FromLongLong(out_meta + meta_len);
done:
    PyBuffer_Release(&runs);
    PyBuffer_Release(&header);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *
same_bytes(PyObject *self, PyObject *args)
{
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

/* ---- plans per (layout, allowlist): any block table in one call ------------------------- */

/* Little-endian loads (the wire format is LE whatever the host). */
static inline uint64_t
load_le(const char *p, int n)
{
    uint64_t v = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(&v, p, (size_t)n);
#else
    for (int i = n - 1; i >= 0; i--) {
        v = (v << 8) | (unsigned char)p[i];
    }
#endif
    return v;
}

/* Non-zero if the n bytes at a and b differ.  The vector versions prefetch both streams
 * COMPARE_PREFETCH bytes ahead: the layout section and the plan's copy of it are usually
 * cold (evicted by the previous trim's copy), and this hides more of the latency than
 * glibc's memcmp does (~1.5 us of the benchmark's 42 KB compare on the dev VM). */
#define COMPARE_PREFETCH 1024
#ifdef HAVE_X86_KERNELS
__attribute__((target("avx512f"))) static int
differs_avx512(const char *a, const char *b, size_t n)
{
    __m512i acc = _mm512_setzero_si512();
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        for (int k = 0; k < 256; k += 64) {
            PREFETCH(a + i + COMPARE_PREFETCH + k);
            PREFETCH(b + i + COMPARE_PREFETCH + k);
        }
        for (int k = 0; k < 256; k += 64) {
            __m512i x = _mm512_loadu_si512((const void *)(a + i + k));
            __m512i y = _mm512_loadu_si512((const void *)(b + i + k));
            acc = _mm512_or_si512(acc, _mm512_xor_si512(x, y));
        }
    }
    return _mm512_test_epi64_mask(acc, acc) != 0 || memcmp(a + i, b + i, n - i) != 0;
}

__attribute__((target("avx2"))) static int
differs_avx2(const char *a, const char *b, size_t n)
{
    __m256i acc = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        for (int k = 0; k < 256; k += 64) {
            PREFETCH(a + i + COMPARE_PREFETCH + k);
            PREFETCH(b + i + COMPARE_PREFETCH + k);
        }
        for (int k = 0; k < 256; k += 32) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(a + i + k));
            __m256i y = _mm256_loadu_si256((const __m256i *)(b + i + k));
            acc = _mm256_or_si256(acc, _mm256_xor_si256(x, y));
        }
    }
    return !_mm256_testz_si256(acc, acc) || memcmp(a + i, b + i, n - i) != 0;
}
#endif

static int
bytes_differ(const char *a, const char *b, size_t n)
{
#ifdef HAVE_X86_KERNELS
    if (kernel == KERNEL_AVX512) {
        return differs_avx512(a, b, n);
    }
    if (kernel == KERNEL_AVX2) {
        return differs_avx2(a, b, n);
    }
#endif
    return memcmp(a, b, n) != 0;
}

/* A new reference to type(data, bytes_in, bytes_out, n_kept, n_missing), a tuple subclass
 * (NamedTuple): built directly, as tuple.__new__(type, items) would. */
static PyObject *
make_result(PyTypeObject *type, PyObject *data, Py_ssize_t bytes_in, Py_ssize_t bytes_out,
            uint64_t n_kept, uint64_t n_missing)
{
    PyObject *items[5] = {data, PyLong_FromSsize_t(bytes_in), PyLong_FromSsize_t(bytes_out),
                          PyLong_FromUnsignedLongLong(n_kept),
                          PyLong_FromUnsignedLongLong(n_missing)};
    PyObject *res = NULL;
    if (items[1] != NULL && items[2] != NULL && items[3] != NULL && items[4] != NULL) {
        res = type->tp_alloc(type, 5);
    }
    if (res == NULL) {
        for (int i = 1; i < 5; i++) {
            Py_XDECREF(items[i]);
        }
        return NULL;
    }
    Py_INCREF(data);
    for (int i = 0; i < 5; i++) {
        PyTuple_SET_ITEM(res, i, items[i]);
    }
    return res;
}

static inline uint64_t
align_up(uint64_t n, uint64_t to)
{
    return (n + to - 1) & ~(to - 1);
}

#define PLAN_MAGIC 0x334e414c504d5254ULL /* "TRMPLAN3" */
#define PLAN_KEY_SIZE 16                 /* "<QQ" (layout_hint, allowlist digest) */

/* One column of a plan: what its block must hold, and whether the output keeps it. */
typedef struct {
    uint32_t elem;  /* bytes per element: per candidate (dense), per value (ragged) */
    uint8_t ragged; /* 1 for a ragged column */
    uint8_t kept;   /* 1 if the allowlist keeps it */
    uint8_t slow;   /* 1 for a ragged column whose elem is not a power of two (a division) */
    uint8_t reserved;
} col_desc;

/* The head of a pack_columns blob (native byte order; the blob never leaves the process),
 * followed, each at an 8-byte aligned offset, by col_desc[n_columns], uint32 kept[n_kept]
 * (increasing column indices) and the output header prefix (preamble with the kept
 * n_columns, layout_len and layout_hint; the kept layout section; its padding), which is
 * out_table_offset bytes long. */
typedef struct {
    uint64_t magic;
    uint64_t n_columns, layout_len, table_offset, n_kept, n_missing;
    uint64_t out_table_offset, header_len;
    uint64_t n_ragged, n_slow; /* ragged columns; those whose elem is not a power of two */
    uint64_t cols_at, kept_at, prefix_at, vec_at, slow_at, blob_len;
} plan_head;

/* The table check's view of the columns: one uint64 per column at vec_at, elem in the low
 * 32 bits plus the flag bits below (8 bytes a column, so a 2000-column plan's descriptors
 * and the table it checks stay in L1).  slow_at: uint32 indices of the n_slow ragged
 * columns whose elem is not a power of two (their value bytes are checked by division). */
#define DESC_RAGGED (1ULL << 32) /* a ragged column */
#define DESC_KEPT (1ULL << 33)   /* the allowlist keeps it */
#define DESC_POW2 (1ULL << 34)   /* ragged with a power-of-two elem: a mask checks it */
#define DESC_ELEM 0xFFFFFFFFULL

static PyObject *
pack_columns(PyObject *self, PyObject *args)
{
    unsigned long long n_columns, layout_len, n_missing;
    Py_buffer elem, ragged, kept, prefix;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "KKy*y*y*y*K:pack_columns", &n_columns, &layout_len, &elem,
                          &ragged, &kept, &prefix, &n_missing)) {
        return NULL;
    }
    const uint64_t *el = (const uint64_t *)elem.buf;
    const uint8_t *rg = (const uint8_t *)ragged.buf;
    const int64_t *kp = (const int64_t *)kept.buf;
    uint64_t n_kept = (uint64_t)kept.len / sizeof(int64_t);
    if (n_columns > UINT32_MAX || layout_len > UINT32_MAX
        || (uint64_t)elem.len != 8 * n_columns || ((uintptr_t)el) % 8 != 0
        || (uint64_t)ragged.len != n_columns || kept.len % 8 != 0 || ((uintptr_t)kp) % 8 != 0
        || n_kept > n_columns || prefix.len < FRAME_PREAMBLE_SIZE
        || prefix.len % FRAME_TABLE_ALIGN != 0 || prefix.len > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "pack_columns: inconsistent sizes");
        goto done;
    }
    for (uint64_t j = 0; j < n_kept; j++) {
        if (kp[j] < 0 || (uint64_t)kp[j] >= n_columns || (j && kp[j] <= kp[j - 1])) {
            PyErr_Format(PyExc_ValueError, "pack_columns: kept[%llu] = %lld is not an "
                         "increasing column index", (unsigned long long)j, (long long)kp[j]);
            goto done;
        }
    }
    plan_head h;
    memset(&h, 0, sizeof h);
    h.magic = PLAN_MAGIC;
    h.n_columns = n_columns;
    h.layout_len = layout_len;
    h.table_offset = align_up(FRAME_PREAMBLE_SIZE + layout_len, FRAME_TABLE_ALIGN);
    h.n_kept = n_kept;
    h.n_missing = n_missing;
    h.out_table_offset = (uint64_t)prefix.len;
    uint64_t out_table_end = h.out_table_offset + FRAME_TABLE_ENTRY_SIZE * n_kept;
    h.header_len = n_kept ? align_up(out_table_end, FRAME_BLOCK_ALIGN) : out_table_end;
    h.cols_at = sizeof h;
    h.kept_at = h.cols_at + sizeof(col_desc) * n_columns;
    h.prefix_at = align_up(h.kept_at + 4 * n_kept, 8);
    h.vec_at = align_up(h.prefix_at + (uint64_t)prefix.len, 8);
    h.slow_at = h.vec_at + 8 * n_columns;
    for (uint64_t i = 0; i < n_columns; i++) {
        h.n_ragged += rg[i] != 0;
        h.n_slow += rg[i] && (el[i] & (el[i] - 1)) != 0;
    }
    h.blob_len = h.slow_at + 4 * h.n_slow;
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)h.blob_len);
    if (result == NULL) {
        goto done;
    }
    char *b = PyBytes_AS_STRING(result);
    memset(b, 0, (size_t)h.blob_len);
    memcpy(b, &h, sizeof h);
    col_desc *cols = (col_desc *)(b + h.cols_at);
    for (uint64_t i = 0; i < n_columns; i++) {
        if (el[i] == 0 || el[i] > FRAME_MAX_ELEM_BYTES || rg[i] > 1) {
            PyErr_Format(PyExc_ValueError, "pack_columns: column %llu has element size %llu, "
                         "ragged flag %u", (unsigned long long)i, (unsigned long long)el[i],
                         (unsigned)rg[i]);
            Py_CLEAR(result);
            goto done;
        }
        cols[i].elem = (uint32_t)el[i];
        cols[i].ragged = rg[i];
        cols[i].slow = rg[i] && (el[i] & (el[i] - 1)) != 0;
    }
    uint64_t *vec = (uint64_t *)(b + h.vec_at);
    uint32_t *slow = (uint32_t *)(b + h.slow_at);
    for (uint64_t i = 0, k = 0; i < n_columns; i++) {
        vec[i] = el[i] | (cols[i].ragged ? DESC_RAGGED : 0)
                 | (cols[i].ragged && !cols[i].slow ? DESC_POW2 : 0);
        if (cols[i].slow) {
            slow[k++] = (uint32_t)i;
        }
    }
    uint32_t *k32 = (uint32_t *)(b + h.kept_at);
    for (uint64_t j = 0; j < n_kept; j++) {
        k32[j] = (uint32_t)kp[j];
        cols[kp[j]].kept = 1;
        vec[kp[j]] |= DESC_KEPT;
    }
    memcpy(b + h.prefix_at, prefix.buf, (size_t)prefix.len);
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&kept);
    PyBuffer_Release(&ragged);
    PyBuffer_Release(&elem);
    return result;
}

/* The preamble checks of format.read_preamble that do not depend on the layout. */
static int
preamble_ok(const char *s, Py_ssize_t n)
{
    static const char zeros[FRAME_RESERVED1_SIZE];
    return n >= FRAME_PREAMBLE_SIZE && memcmp(s + FRAME_MAGIC_AT, FRAME_MAGIC, FRAME_MAGIC_SIZE) == 0
           && load_le(s + FRAME_VERSION_AT, FRAME_VERSION_SIZE) == FRAME_VERSION
           && load_le(s + FRAME_FLAGS_AT, FRAME_FLAGS_SIZE) == 0
           && load_le(s + FRAME_RESERVED0_AT, FRAME_RESERVED0_SIZE) == 0
           && memcmp(s + FRAME_RESERVED1_AT, zeros, FRAME_RESERVED1_SIZE) == 0
           && load_le(s + FRAME_FRAME_LEN_AT, FRAME_FRAME_LEN_SIZE) == (uint64_t)n;
}

/* One request, as read and validated by read_request. */
typedef struct {
    PyObject *entry; /* the cache entry (a new reference), kept alive for the call */
    const char *blob, *s, *table;
    const char *memo; /* the plan's memo, when it holds this request's header and runs */
    const plan_head *h;
    Py_ssize_t n;
    uint64_t n_cand, meta_off, meta_len, out_meta;
} request;

#define TABLE_OFF(t, i) \
    load_le((t) + FRAME_TABLE_ENTRY_SIZE * (i) + FRAME_TABLE_OFFSET_AT, FRAME_TABLE_OFFSET_SIZE)
#define TABLE_NB(t, i) \
    load_le((t) + FRAME_TABLE_ENTRY_SIZE * (i) + FRAME_TABLE_NBYTES_AT, FRAME_TABLE_NBYTES_SIZE)

/* Validate every block of the table as format.check_table does (alignment, order,
 * overlap, bounds, exact sizes) and return where the output's data ends (its metadata
 * offset: out_start plus the kept blocks, each padded to BLOCK_ALIGN but the last), or 0 if
 * any block is bad.  No data-dependent branches (kept and ragged columns come in random
 * patterns; mispredictions would cost more than the arithmetic); an AVX2 version checks
 * four columns per step (~4x faster: ~6 us -> ~1.5 us for 2000 columns on the dev VM). */
typedef struct {
    const char *t;
    const uint64_t *vec; /* DESC_* words, one per column */
    uint64_t n, n_cand, head, data_start, data_end;
} table_check;

static inline uint64_t
check_one(const table_check *c, uint64_t i, uint64_t *prev, uint64_t *sum)
{
    const uint64_t off = TABLE_OFF(c->t, i), nb = TABLE_NB(c->t, i);
    const uint64_t desc = c->vec[i], elem = desc & DESC_ELEM;
    const uint64_t rmask = -(uint64_t)((desc & DESC_RAGGED) != 0);
    const uint64_t kmask = -(uint64_t)((desc & DESC_KEPT) != 0);
    const uint64_t emask = (desc & DESC_POW2) ? elem - 1 : 0;
    uint64_t bad = (off & (FRAME_BLOCK_ALIGN - 1)) | (uint64_t)(off < *prev)
                   | (uint64_t)(off > c->data_end) | (uint64_t)(nb > c->data_end - off);
    const uint64_t rag = (uint64_t)(nb < c->head) | ((nb - c->head) & emask);
    bad |= (rag & rmask) | ((nb ^ (c->n_cand * elem)) & ~rmask);
    *prev = off + nb;
    *sum += align_up(nb, FRAME_BLOCK_ALIGN) & kmask;
    return bad;
}

static uint64_t
check_range(const table_check *c, uint64_t i, uint64_t prev, uint64_t *sum)
{
    uint64_t bad = 0;
    for (; i < c->n; i++) {
        bad |= check_one(c, i, &prev, sum);
    }
    return bad;
}

#ifdef HAVE_X86_KERNELS
__attribute__((target("avx2"))) static uint64_t
check_range_avx2(const table_check *c, uint64_t *sum_out)
{
    const __m256i sign = _mm256_set1_epi64x(INT64_MIN), zero = _mm256_setzero_si256();
    const __m256i low = _mm256_set1_epi64x(FRAME_BLOCK_ALIGN - 1);
    const __m256i end = _mm256_set1_epi64x((long long)c->data_end);
    const __m256i end_s = _mm256_xor_si256(end, sign);
    const __m256i head = _mm256_set1_epi64x((long long)c->head);
    const __m256i head_s = _mm256_xor_si256(head, sign);
    const __m256i cand = _mm256_set1_epi64x((long long)c->n_cand);
    const __m256i elem_bits = _mm256_set1_epi64x((long long)DESC_ELEM);
    const __m256i rag_bit = _mm256_set1_epi64x((long long)DESC_RAGGED);
    const __m256i kept_bit = _mm256_set1_epi64x((long long)DESC_KEPT);
    const __m256i pow2_bit = _mm256_set1_epi64x((long long)DESC_POW2);
    const __m256i one = _mm256_set1_epi64x(1);
    __m256i bad = zero, sum = zero, carry = _mm256_set1_epi64x((long long)c->data_start);
    const uint64_t *vec = c->vec, n = c->n;
    uint64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256i e01 = _mm256_loadu_si256((const __m256i *)(c->t + FRAME_TABLE_ENTRY_SIZE * i));
        __m256i e23 = _mm256_loadu_si256((const __m256i *)(c->t + FRAME_TABLE_ENTRY_SIZE * i + 32));
        __m256i off = _mm256_permute4x64_epi64(_mm256_unpacklo_epi64(e01, e23), 0xD8);
        __m256i nb = _mm256_permute4x64_epi64(_mm256_unpackhi_epi64(e01, e23), 0xD8);
        __m256i ends = _mm256_add_epi64(off, nb);
        /* each block's predecessor end: [carry, end0, end1, end2] */
        __m256i prev = _mm256_blend_epi32(_mm256_permute4x64_epi64(ends, 0x93), carry, 0x03);
        carry = _mm256_permute4x64_epi64(ends, 0xFF);
        __m256i off_s = _mm256_xor_si256(off, sign), nb_s = _mm256_xor_si256(nb, sign);
        __m256i b = _mm256_and_si256(off, low);
        b = _mm256_or_si256(b, _mm256_cmpgt_epi64(_mm256_xor_si256(prev, sign), off_s));
        b = _mm256_or_si256(b, _mm256_cmpgt_epi64(off_s, end_s));
        b = _mm256_or_si256(b, _mm256_cmpgt_epi64(
                                   nb_s, _mm256_xor_si256(_mm256_sub_epi64(end, off), sign)));
        __m256i desc = _mm256_loadu_si256((const __m256i *)(vec + i));
        __m256i elem = _mm256_and_si256(desc, elem_bits);
        __m256i rmask = _mm256_cmpeq_epi64(_mm256_and_si256(desc, rag_bit), rag_bit);
        __m256i kmask = _mm256_cmpeq_epi64(_mm256_and_si256(desc, kept_bit), kept_bit);
        __m256i emask = _mm256_and_si256(
            _mm256_cmpeq_epi64(_mm256_and_si256(desc, pow2_bit), pow2_bit),
            _mm256_sub_epi64(elem, one));
        __m256i dense = _mm256_xor_si256(nb, _mm256_mul_epu32(cand, elem));
        __m256i rag = _mm256_or_si256(_mm256_cmpgt_epi64(head_s, nb_s),
                                      _mm256_and_si256(_mm256_sub_epi64(nb, head), emask));
        b = _mm256_or_si256(b, _mm256_or_si256(_mm256_and_si256(rag, rmask),
                                               _mm256_andnot_si256(rmask, dense)));
        bad = _mm256_or_si256(bad, b);
        __m256i padded = _mm256_andnot_si256(low, _mm256_add_epi64(nb, low));
        sum = _mm256_add_epi64(sum, _mm256_and_si256(padded, kmask));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, sum);
    *sum_out = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    uint64_t acc = (uint64_t)!_mm256_testz_si256(bad, bad);
    return acc | check_range(c, i, (uint64_t)_mm256_extract_epi64(carry, 0), sum_out);
}
#endif

static uint64_t
check_blocks(const char *t, const char *blob, uint64_t n_cand, uint64_t data_start,
             uint64_t data_end)
{
    const plan_head *h = (const plan_head *)blob;
    const table_check c = {
        t, (const uint64_t *)(blob + h->vec_at), h->n_columns, n_cand,
        align_up(FRAME_RAGGED_OFFSET_SIZE * (n_cand + 1), FRAME_BLOCK_ALIGN), data_start,
        data_end,
    };
    uint64_t bad, sum = 0;
#ifdef HAVE_X86_KERNELS
    if (kernel >= KERNEL_AVX2) {
        bad = check_range_avx2(&c, &sum);
    }
    else
#endif
    {
        bad = check_range(&c, 0, data_start, &sum);
    }
    const uint32_t *slow = (const uint32_t *)(blob + h->slow_at);
    for (uint64_t k = 0; k < h->n_slow; k++) { /* nb >= head is checked above */
        const uint64_t nb = TABLE_NB(t, slow[k]);
        bad |= nb >= c.head ? (nb - c.head) % (c.vec[slow[k]] & DESC_ELEM) : 0;
    }
    if (bad) {
        return 0;
    }
    uint64_t last = 0;
    if (h->n_kept) {
        last = TABLE_NB(t, ((const uint32_t *)(blob + h->kept_at))[h->n_kept - 1]);
    }
    return h->header_len + sum - align_up(last, FRAME_BLOCK_ALIGN) + last;
}

/* Non-zero if the ragged offsets o[0..c] are not non-decreasing (int64, little-endian). */
#define OFFSET_SIZE FRAME_RAGGED_OFFSET_SIZE
_Static_assert(OFFSET_SIZE == sizeof(int64_t), "ragged offsets are int64");
#ifdef HAVE_X86_KERNELS
__attribute__((target("avx2"))) static int
decreasing_avx2(const char *o, uint64_t c)
{
    __m256i acc = _mm256_setzero_si256();
    uint64_t i = 0;
    for (; i + 4 <= c; i += 4) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(o + OFFSET_SIZE * i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(o + OFFSET_SIZE * (i + 1)));
        acc = _mm256_or_si256(acc, _mm256_cmpgt_epi64(a, b));
    }
    int bad = !_mm256_testz_si256(acc, acc);
    for (; i < c; i++) {
        bad |= (int64_t)load_le(o + OFFSET_SIZE * i, OFFSET_SIZE)
               > (int64_t)load_le(o + OFFSET_SIZE * (i + 1), OFFSET_SIZE);
    }
    return bad;
}
#endif

static int
decreasing(const char *o, uint64_t c)
{
#ifdef HAVE_X86_KERNELS
    if (kernel >= KERNEL_AVX2) {
        return decreasing_avx2(o, c);
    }
#endif
    int bad = 0;
    for (uint64_t i = 0; i < c; i++) {
        bad |= (int64_t)load_le(o + OFFSET_SIZE * i, OFFSET_SIZE)
               > (int64_t)load_le(o + OFFSET_SIZE * (i + 1), OFFSET_SIZE);
    }
    return bad;
}

/* Non-zero if a kept ragged column's offsets head is bad: offsets[0] != 0, a decrease, or
 * offsets[C] != n_values (as format.check_ragged_offsets).  The table is valid. */
static int
ragged_bad(const request *rq, const col_desc *cols, const uint32_t *kept)
{
    const uint64_t c = rq->n_cand;
    const uint64_t head = align_up(FRAME_RAGGED_OFFSET_SIZE * (c + 1), FRAME_BLOCK_ALIGN);
    for (uint64_t j = 0; j < rq->h->n_kept; j++) {
        const col_desc cd = cols[kept[j]];
        if (!cd.ragged) {
            continue;
        }
        const char *o = rq->s + TABLE_OFF(rq->table, kept[j]);
        const uint64_t n_values = (TABLE_NB(rq->table, kept[j]) - head) / cd.elem;
        if (load_le(o, OFFSET_SIZE) != 0 || load_le(o + OFFSET_SIZE * c, OFFSET_SIZE) != n_values
            || decreasing(o, c)) {
            return 1;
        }
    }
    return 0;
}

/* A plan's memo (a bytearray of memo_size(blob) bytes the Python side allocates): the last
 * block table that passed check_blocks for the plan, with its n_candidates, meta_offset,
 * output metadata offset, output header and coalesced runs -- kept only for plans without
 * ragged columns, whose tables repeat from request to request (dense frames with a
 * repeated candidate count: every request).  A request whose table is byte for byte the
 * memo's skips the per-column checks, the output table and the run computation for one
 * compare, which exits at the first differing chunk.  Read and written with the GIL held.
 *
 *   memo_head | table [16 * n_columns] | header [header_len, 8-aligned] | runs [n_kept][2]
 */
typedef struct {
    uint64_t valid, n_cand, meta_off, out_meta, n_runs;
} memo_head;
#define MEMO_HEAD_SIZE ((uint64_t)sizeof(memo_head))
#define MEMO_CHUNK 2048
#define MEMO_TABLE(m) ((m) + MEMO_HEAD_SIZE)
#define MEMO_HEADER(m, h) (MEMO_TABLE(m) + FRAME_TABLE_ENTRY_SIZE * (h)->n_columns)
#define MEMO_RUNS(m, h) ((uint64_t *)(MEMO_HEADER(m, h) + align_up((h)->header_len, 8)))

static uint64_t
memo_bytes(const plan_head *h)
{
    return MEMO_HEAD_SIZE + FRAME_TABLE_ENTRY_SIZE * h->n_columns + align_up(h->header_len, 8)
           + 16 * h->n_kept;
}

static uint64_t
memo_lookup(const char *memo, const char *table, const request *rq)
{
    memo_head m;
    memcpy(&m, memo, sizeof m);
    if (!m.valid || m.n_cand != rq->n_cand || m.meta_off != rq->meta_off) {
        return 0;
    }
    const char *want = MEMO_TABLE(memo);
    const size_t len = (size_t)(FRAME_TABLE_ENTRY_SIZE * rq->h->n_columns);
    for (size_t at = 0; at < len; at += MEMO_CHUNK) {
        const size_t n = len - at < MEMO_CHUNK ? len - at : MEMO_CHUNK;
        if (bytes_differ(table + at, want + at, n)) {
            return 0;
        }
    }
    return m.out_meta;
}

static void memo_store(char *memo, const request *rq);

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

/* Read and validate one request against its cached plan: 1 if it can be served (rq filled,
 * rq->entry a new reference), 0 if not (no entry, anything differs or is invalid: the
 * general path then serves it or words the error), -1 with an exception set. */
static int
read_request(PyObject *cache, const Py_buffer *src, PyObject *digest_obj, int check_ragged,
             request *rq)
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
    PyObject *key = plan_key(keybuf);
    if (key == NULL) {
        return -1;
    }
    PyObject *entry = PyDict_GetItemWithError(cache, key);
    if (entry == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3
        || !PyBytes_CheckExact(PyTuple_GET_ITEM(entry, 0))
        || !PyBytes_CheckExact(PyTuple_GET_ITEM(entry, 1))
        || !PyByteArray_CheckExact(PyTuple_GET_ITEM(entry, 2))
        || PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 1)) < (Py_ssize_t)sizeof(plan_head)) {
        PyErr_SetString(PyExc_TypeError,
                        "trimmer plan cache entries must be (bytes, plan blob, memo bytearray)");
        return -1;
    }
    PyObject *layout = PyTuple_GET_ITEM(entry, 0), *memo_obj = PyTuple_GET_ITEM(entry, 2);
    const char *blob = PyBytes_AS_STRING(PyTuple_GET_ITEM(entry, 1));
    const plan_head *h = (const plan_head *)blob;
    if (h->magic != PLAN_MAGIC
        || (uint64_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 1)) != h->blob_len
        || (uint64_t)PyByteArray_GET_SIZE(memo_obj) != memo_bytes(h)) {
        PyErr_SetString(PyExc_TypeError, "trimmer plan cache entry holds no pack_columns blob");
        return -1;
    }
    /* The layout must be the plan's, byte for byte; then the table must fit before the
     * metadata, and every block must be valid. */
    const uint64_t table_end = h->table_offset + FRAME_TABLE_ENTRY_SIZE * n_columns;
    if (h->n_columns != n_columns || h->layout_len != layout_len
        || (uint64_t)PyBytes_GET_SIZE(layout) != layout_len || table_end > rq->meta_off
        || bytes_differ(s + FRAME_PREAMBLE_SIZE, PyBytes_AS_STRING(layout), (size_t)layout_len)) {
        return 0;
    }
    const char *table = s + h->table_offset;
    char *memo = PyByteArray_AS_STRING(memo_obj);
    rq->blob = blob;
    rq->h = h;
    rq->s = s;
    rq->n = n;
    rq->table = table;
    rq->out_meta = memo_lookup(memo, table, rq);
    if (rq->out_meta != 0) {
        rq->memo = memo;
    }
    else {
        rq->out_meta = check_blocks(table, blob, rq->n_cand, table_end, rq->meta_off);
        if (rq->out_meta == 0) {
            return 0;
        }
    }
    if (check_ragged && ragged_bad(rq, (const col_desc *)(blob + h->cols_at),
                                   (const uint32_t *)(blob + h->kept_at))) {
        return 0;
    }
    if (rq->memo == NULL && h->n_ragged == 0) { /* ragged lengths change tables: no memo */
        memo_store(memo, rq);
        rq->memo = memo;
    }
    Py_INCREF(entry); /* the cache may drop it while the GIL is released */
    rq->entry = entry;
    return 1;
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

/* Record this request's (validated) table, header and runs as the plan's memo. */
static void
memo_store(char *memo, const request *rq)
{
    memo_head m = {0, rq->n_cand, rq->meta_off, rq->out_meta, 0};
    memcpy(memo, &m, sizeof m); /* invalid while it changes */
    memcpy(MEMO_TABLE(memo), rq->table, (size_t)(FRAME_TABLE_ENTRY_SIZE * rq->h->n_columns));
    m.n_runs = build_output(MEMO_HEADER(memo, rq->h), rq, MEMO_RUNS(memo, rq->h));
    m.valid = 1;
    memcpy(memo, &m, sizeof m);
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
static void
copy_list(char *d, const request *rq, const uint64_t *runs, uint64_t n_runs, int backwards)
{
    const char *s = rq->s;
    if (!backwards) {
        char *at = d + rq->h->header_len;
        for (uint64_t i = 0; i < n_runs; i++) {
            if (i + PREFETCH_AHEAD < n_runs) {
                for (int k = 0; k < PREFETCH_LINES; k++) {
                    PREFETCH(s + runs[2 * (i + PREFETCH_AHEAD)] + 64 * k);
                }
            }
            copy_run(at, s + runs[2 * i], (size_t)runs[2 * i + 1]);
            at += runs[2 * i + 1];
        }
        return;
    }
    char *end = d + rq->out_meta;
    for (uint64_t i = n_runs; i-- > 0;) {
        if (i >= PREFETCH_AHEAD) {
            for (int k = 0; k < PREFETCH_LINES; k++) {
                PREFETCH(s + runs[2 * (i - PREFETCH_AHEAD)] + 64 * k);
            }
        }
        end -= runs[2 * i + 1];
        copy_run(end, s + runs[2 * i], (size_t)runs[2 * i + 1]);
    }
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
        /* src, out and the plan entry are all held: nothing moves or goes away.  Another
         * thread may rewrite the memo meanwhile, so its runs are copied out first. */
        if (rl.runs != sc.runs) {
            uint64_t *own = rl.n_runs > SCRATCH_RUNS ? PyMem_Malloc((size_t)(16 * rl.n_runs))
                                                     : sc.local;
            if (own == NULL) {
                scratch_free(&sc);
                PyErr_NoMemory();
                return -1;
            }
            memcpy(own, rl.runs, (size_t)(16 * rl.n_runs));
            rl.runs = sc.runs = own;
        }
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

static PyObject *
memo_size(PyObject *self, PyObject *blob)
{
    if (!PyBytes_Check(blob) || PyBytes_GET_SIZE(blob) < (Py_ssize_t)sizeof(plan_head)
        || ((const plan_head *)PyBytes_AS_STRING(blob))->magic != PLAN_MAGIC) {
        PyErr_SetString(PyExc_TypeError, "memo_size(blob): not a pack_columns blob");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(memo_bytes((const plan_head *)PyBytes_AS_STRING(blob)));
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

/* A writable, 1-D, C-contiguous unsigned-byte memoryview of out with exactly len bytes
 * (a new bytearray for None); NULL without an exception when out does not qualify. */
static PyObject *
output_view(PyObject *out_obj, uint64_t len)
{
    PyObject *data;
    if (out_obj == Py_None) {
        PyObject *fresh = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)len);
        if (fresh == NULL) {
            return NULL;
        }
        data = PyMemoryView_FromObject(fresh);
        Py_DECREF(fresh);
        return data;
    }
    if (!PyObject_CheckBuffer(out_obj) || (data = PyMemoryView_FromObject(out_obj)) == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_buffer *view = PyMemoryView_GET_BUFFER(data);
    if (view->readonly || view->ndim != 1 || (view->format != NULL && strcmp(view->format, "B") != 0)
        || !PyBuffer_IsContiguous(view, 'C') || (uint64_t)view->len < len) {
        Py_DECREF(data);
        return NULL;
    }
    if ((uint64_t)view->len != len) {
        /* Shorten this new, not yet shared 1-D byte view in place (what slicing it would
         * set up in a second memoryview; its managed buffer keeps the full export). */
        view->len = (Py_ssize_t)len;
        view->shape[0] = (Py_ssize_t)len;
    }
    return data;
}

static PyObject *
plan_trim(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_call("plan_trim", args, nargs, 6, 5) < 0) {
        return NULL;
    }
    int check_ragged = PyObject_IsTrue(args[4]);
    if (check_ragged < 0) {
        return NULL;
    }
    Py_buffer src;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* the general path words the error */
        Py_RETURN_NONE;
    }
    request rq = {0};
    PyObject *result = NULL, *data = NULL;
    int ok = read_request(args[0], &src, args[3], check_ragged, &rq);
    if (ok <= 0) {
        result = ok < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    const uint64_t out_len = rq.out_meta + rq.meta_len;
    data = output_view(args[2], out_len);
    if (data == NULL) {
        result = PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    if (write_trimmed((char *)PyMemoryView_GET_BUFFER(data)->buf, &rq) == 0) {
        result = make_result((PyTypeObject *)args[5], data, src.len, (Py_ssize_t)out_len,
                             rq.h->n_kept, rq.h->n_missing);
    }
done:
    Py_XDECREF(data);
    Py_XDECREF(rq.entry);
    PyBuffer_Release(&src);
    return result;
}

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
    int ok = read_request(args[0], &src, args[2], check_ragged, &rq);
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
    Py_XDECREF(rq.entry);
    PyBuffer_Release(&src);
    return result;
}

static PyMethodDef methods[] = {
    {"copy_runs", copy_runs, METH_VARARGS,
     "copy_runs(dst, src, runs) -> int: memcpy each (src_off, dst_off, len) int64 run."},
    {"write_frame", write_frame, METH_VARARGS,
     "write_frame(dst, src, header, runs, meta_offset, meta_len, out_meta_offset) -> int."},
    {"same_bytes", same_bytes, METH_VARARGS,
     "same_bytes(buf, offset, expected) -> bool: memcmp of a region against bytes."},
    {"set_kernel", set_kernel, METH_O,
     "set_kernel(name) -> name: use another supported copy kernel (tests, benchmarks)."},
    {"pack_columns", pack_columns, METH_VARARGS,
     "pack_columns(n_columns, layout_len, elem, ragged, kept, prefix, n_missing) -> bytes: "
     "a checked plan blob for plan_trim / plan_parts."},
    {"memo_size", memo_size, METH_O,
     "memo_size(blob) -> int: bytes of the memo bytearray a plan cache entry carries."},
    {"plan_trim", (PyCFunction)(void (*)(void))plan_trim, METH_FASTCALL,
     "plan_trim(cache, src, out, digest, check_ragged, result_type) -> result or None."},
    {"plan_parts", (PyCFunction)(void (*)(void))plan_parts, METH_FASTCALL,
     "plan_parts(cache, src, digest, check_ragged, max_parts, result_type) -> result or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "root_worker.frame._copyruns",
    "Bounds-checked byte-run copy and the trim engine's one-call fast path (optional "
    "accelerator).", -1, methods,
};

PyMODINIT_FUNC
PyInit__copyruns(void)
{
    detect_cpu();
    if (PyType_Ready(&PinType) < 0 || PyType_Ready(&SpanType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddStringConstant(m, "KERNEL", kernel_names[kernel]) < 0
                      || PyModule_AddObjectRef(m, "Span", (PyObject *)&SpanType) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
