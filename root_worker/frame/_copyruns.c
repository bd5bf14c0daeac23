/*
 * root_worker.frame._copyruns: the byte-moving primitives of the frame trim engine.
 *
 * Optional accelerator: root_worker/frame/backends.py has a pure numpy/Python fallback with the
 * same semantics, and the tests run both.  Everything is bounds-checked before the first
 * byte moves, so a bad runs array raises ValueError and never touches memory out of range.
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
 *       The whole output step of one trim: dst[:len(header)] = header; patch the three
 *       per-request preamble fields (frame_len u64 at 32, meta_offset u64 at 40, meta_len
 *       u32 at 48, little-endian); copy_runs(dst, src, runs); copy the metadata
 *       src[meta_offset:+meta_len] to dst[out_meta_offset:].  Returns the output length.
 *
 *   same_bytes(buf, offset, expected) -> bool
 *       True if buf[offset:offset + len(expected)] == expected (memcmp, no temporary
 *       copy); False if that range is not inside buf.
 *
 *   pack_plan(n_columns, layout_len, n_candidates, meta_offset, table_offset, table, header,
 *             runs, out_meta_offset, n_kept, n_missing) -> bytes
 *       Packs one validated size plan of the trim engine into an immutable blob for
 *       fast_trim, after checking its invariants (ValueError otherwise): the table lies
 *       after the layout and before the metadata, the header is at least a preamble, and
 *       the runs read inside [0, meta_offset) and tile [len(header), out_meta_offset)
 *       exactly, in order -- so fast_trim needs no per-run bounds check and writes every
 *       output byte.  A block table that is an arithmetic progression (offset base + i *
 *       stride, nbytes constant: any canonical frame whose columns all have one size) is
 *       stored as those three numbers and checked without reading a cached copy.
 *
 *   fast_trim(cache, src, out, digest, result_type) -> result_type(...) | None
 *       The trimmer's whole steady-state request in one call.  Reads src's preamble and
 *       checks it as read_preamble does (magic, version, flags, reserved, frame_len,
 *       meta_offset + meta_len), looks up cache[key] where key = 32 bytes
 *       "<QQQQ"(layout_hint, digest, n_candidates, meta_offset), an entry being the tuple
 *       (layout_bytes, blob from pack_plan); verifies n_columns, layout_len, the layout
 *       bytes (memcmp) and the block table against the entry; then writes the output into
 *       out (a writable 1-D unsigned-byte buffer, or None for a new bytearray) and returns
 *       result_type(memoryview of the output, len(src), output length, n_kept, n_missing)
 *       -- a tuple subclass such as a NamedTuple.  Returns None, having written nothing,
 *       whenever anything differs or does not fit (no entry, other layout or table, odd
 *       buffer types, out too small, ...): the caller then takes its general path, which
 *       also words the errors.  The input is never trusted: a hit requires every byte that
 *       decides what is copied to equal the plan's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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
    while (dd < dend) {
        _mm256_store_si256((__m256i *)dd, _mm256_loadu_si256((const __m256i *)ss));
        dd += 32;
        ss += 32;
    }
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
/* Per-request preamble fields (docs/frame-format.md): frame_len, meta_offset, meta_len. */
#define FRAME_TAIL_OFFSET 32
#define FRAME_TAIL_END (FRAME_TAIL_OFFSET + 8 + 8 + 4)

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
    store_le(d + FRAME_TAIL_OFFSET, (uint64_t)(out_meta + meta_len), 8);
    store_le(d + FRAME_TAIL_OFFSET + 8, (uint64_t)out_meta, 8);
    store_le(d + FRAME_TAIL_OFFSET + 16, (uint64_t)meta_len, 4);
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


/* ---- fast path: packed plans ---------------------------------------------------------- */

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

#define FRAME_PREAMBLE_SIZE 64
#define FAST_KEY_SIZE 32
#define PLAN_MAGIC 0x324e414c504d5254ULL /* "TRMPLAN2" */
#define TABLE_BYTES 0   /* a block table kept as bytes */
#define TABLE_UNIFORM 1 /* entry i == (base + i * stride, nbytes): kept as three numbers */

/* The head of a pack_plan blob (native byte order; the blob never leaves the process),
 * followed by the input block table (TABLE_BYTES only), the output header and the runs,
 * each at an 8-byte aligned offset of the blob.  Runs are packed as uint32 pairs
 * (source offset / 64, length): their output offsets follow from tiling. */
typedef struct {
    uint64_t magic;
    uint64_t n_columns, layout_len, n_candidates, meta_offset;
    uint64_t table_offset, table_mode, t_base, t_stride, t_nbytes;
    uint64_t header_len, out_table_offset, n_kept, out_table_mode, o_base, o_stride, o_nbytes;
    uint64_t out_meta_offset, n_runs, n_missing;
    uint64_t table_at, header_at, runs_at, blob_len;
} plan_head;

static uint64_t
round8(uint64_t n)
{
    return (n + 7) & ~(uint64_t)7;
}

/* TABLE_UNIFORM (and base, stride, nbytes) if the n-entry table at t is arithmetic. */
static uint64_t
table_shape(const char *t, uint64_t n, uint64_t *base, uint64_t *stride, uint64_t *nbytes)
{
    *base = n ? load_le(t, 8) : 0;
    *nbytes = n ? load_le(t + 8, 8) : 0;
    *stride = n > 1 ? load_le(t + 16, 8) - *base : 0;
    for (uint64_t i = 0; i < n; i++) {
        if (load_le(t + 16 * i, 8) != *base + i * *stride || load_le(t + 16 * i + 8, 8) != *nbytes) {
            return TABLE_BYTES;
        }
    }
    return TABLE_UNIFORM;
}

/* Non-zero if the n-entry block table at t is not (base + i * stride, nbytes). */
#ifdef HAVE_X86_KERNELS
__attribute__((target("avx512f"))) static uint64_t
uniform_differs_avx512(const char *t, uint64_t n, uint64_t base, uint64_t stride,
                       uint64_t nbytes)
{
    /* four (offset, nbytes) entries per vector */
    __m512i want = _mm512_set_epi64((long long)nbytes, (long long)(base + 3 * stride),
                                    (long long)nbytes, (long long)(base + 2 * stride),
                                    (long long)nbytes, (long long)(base + stride),
                                    (long long)nbytes, (long long)base);
    const __m512i step = _mm512_set_epi64(0, (long long)(4 * stride), 0,
                                          (long long)(4 * stride), 0, (long long)(4 * stride),
                                          0, (long long)(4 * stride));
    __m512i bad = _mm512_setzero_si512();
    uint64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m512i got = _mm512_loadu_si512((const void *)(t + 16 * i));
        bad = _mm512_or_si512(bad, _mm512_xor_si512(got, want));
        want = _mm512_add_epi64(want, step);
    }
    uint64_t acc = (uint64_t)_mm512_test_epi64_mask(bad, bad);
    for (uint64_t off = base + i * stride; i < n; i++, off += stride) {
        acc |= (load_le(t + 16 * i, 8) ^ off) | (load_le(t + 16 * i + 8, 8) ^ nbytes);
    }
    return acc;
}

__attribute__((target("avx512f"))) static void
write_uniform_avx512(char *t, uint64_t n, uint64_t base, uint64_t stride, uint64_t nbytes)
{
    __m512i v = _mm512_set_epi64((long long)nbytes, (long long)(base + 3 * stride),
                                 (long long)nbytes, (long long)(base + 2 * stride),
                                 (long long)nbytes, (long long)(base + stride),
                                 (long long)nbytes, (long long)base);
    const __m512i step = _mm512_set_epi64(0, (long long)(4 * stride), 0,
                                          (long long)(4 * stride), 0, (long long)(4 * stride),
                                          0, (long long)(4 * stride));
    uint64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        _mm512_storeu_si512((void *)(t + 16 * i), v);
        v = _mm512_add_epi64(v, step);
    }
    for (uint64_t off = base + i * stride; i < n; i++, off += stride) {
        store_le(t + 16 * i, off, 8);
        store_le(t + 16 * i + 8, nbytes, 8);
    }
}
#endif

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

static uint64_t
uniform_table_differs(const char *t, uint64_t n, uint64_t base, uint64_t stride,
                      uint64_t nbytes)
{
#ifdef HAVE_X86_KERNELS
    if (kernel == KERNEL_AVX512) {
        return uniform_differs_avx512(t, n, base, stride, nbytes);
    }
    /* SSE2 (x86-64 baseline): one (offset, nbytes) entry per vector */
    __m128i want = _mm_set_epi64x((long long)nbytes, (long long)base);
    const __m128i step = _mm_set_epi64x(0, (long long)stride);
    __m128i bad = _mm_setzero_si128();
    for (uint64_t i = 0; i < n; i++) {
        __m128i got = _mm_loadu_si128((const __m128i *)(t + 16 * i));
        bad = _mm_or_si128(bad, _mm_xor_si128(got, want));
        want = _mm_add_epi64(want, step);
    }
    return (uint64_t)(_mm_movemask_epi8(_mm_cmpeq_epi8(bad, _mm_setzero_si128())) != 0xFFFF);
#else
    uint64_t acc = 0, off = base;
    for (uint64_t i = 0; i < n; i++, off += stride) {
        acc |= (load_le(t + 16 * i, 8) ^ off) | (load_le(t + 16 * i + 8, 8) ^ nbytes);
    }
    return acc;
#endif
}

static void
write_uniform_table(char *t, uint64_t n, uint64_t base, uint64_t stride, uint64_t nbytes)
{
#ifdef HAVE_X86_KERNELS
    if (kernel == KERNEL_AVX512) {
        write_uniform_avx512(t, n, base, stride, nbytes);
        return;
    }
#endif
#ifdef HAVE_X86_KERNELS
    __m128i v = _mm_set_epi64x((long long)nbytes, (long long)base);
    const __m128i step = _mm_set_epi64x(0, (long long)stride);
    for (uint64_t i = 0; i < n; i++) {
        _mm_storeu_si128((__m128i *)(t + 16 * i), v);
        v = _mm_add_epi64(v, step);
    }
#else
    for (uint64_t i = 0, off = base; i < n; i++, off += stride) {
        store_le(t + 16 * i, off, 8);
        store_le(t + 16 * i + 8, nbytes, 8);
    }
#endif
}

static PyObject *
pack_plan(PyObject *self, PyObject *args)
{
    unsigned long long n_columns, layout_len, n_cand, meta_off, table_off, out_table_off,
        out_meta, n_kept, n_missing;
    Py_buffer table, header, runs;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "KKKKKy*y*Ky*KKK:pack_plan", &n_columns, &layout_len, &n_cand,
                          &meta_off, &table_off, &table, &header, &out_table_off, &runs,
                          &out_meta, &n_kept, &n_missing)) {
        return NULL;
    }
    const uint64_t limit = (uint64_t)1 << 40; /* keeps every sum below 2**64 */
    Py_ssize_t n_runs = runs.len / (3 * (Py_ssize_t)sizeof(int64_t));
    const int64_t *r = (const int64_t *)runs.buf;
    if (runs.len % (3 * (Py_ssize_t)sizeof(int64_t)) != 0
        || ((uintptr_t)r) % sizeof(int64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "pack_plan: runs must be aligned int64 triples");
        goto done;
    }
    if (n_columns > limit || n_kept > limit || layout_len > limit || meta_off > limit
        || out_meta > limit || table_off > limit || out_table_off > limit
        || table_off < FRAME_PREAMBLE_SIZE + layout_len
        || (uint64_t)table.len != 16 * n_columns || table_off + (uint64_t)table.len > meta_off
        || header.len < FRAME_TAIL_END || (uint64_t)header.len > out_meta
        || out_table_off < FRAME_PREAMBLE_SIZE
        || out_table_off + 16 * n_kept > (uint64_t)header.len) {
        PyErr_SetString(PyExc_ValueError,
                        "pack_plan: table, header or metadata offsets are inconsistent");
        goto done;
    }
    /* The runs must tile [len(header), out_meta) in order, read inside [0, meta_offset),
     * and pack into (source / 64, length) uint32 pairs. */
    uint64_t at = (uint64_t)header.len;
    for (Py_ssize_t i = 0; i < n_runs; i++) {
        int64_t so = r[3 * i], d = r[3 * i + 1], len = r[3 * i + 2];
        if (so < 0 || len < 0 || (uint64_t)d != at || (uint64_t)so > meta_off
            || (uint64_t)len > meta_off - (uint64_t)so || (uint64_t)len > out_meta - at) {
            PyErr_Format(PyExc_ValueError,
                         "pack_plan: run %zd (src %lld, dst %lld, len %lld) does not continue "
                         "the output at %llu inside the input's data",
                         i, (long long)so, (long long)d, (long long)len, (unsigned long long)at);
            goto done;
        }
        if (so % 64 != 0 || (uint64_t)so / 64 > UINT32_MAX || (uint64_t)len > UINT32_MAX) {
            PyErr_Format(PyExc_ValueError,
                         "pack_plan: run %zd (src %lld, len %lld) cannot be packed", i,
                         (long long)so, (long long)len);
            goto done;
        }
        at += (uint64_t)len;
    }
    if (at != out_meta) {
        PyErr_Format(PyExc_ValueError, "pack_plan: runs end at %llu, not at the metadata (%llu)",
                     (unsigned long long)at, out_meta);
        goto done;
    }

    plan_head h;
    memset(&h, 0, sizeof h);
    h.magic = PLAN_MAGIC;
    h.n_columns = n_columns;
    h.layout_len = layout_len;
    h.n_candidates = n_cand;
    h.meta_offset = meta_off;
    h.table_offset = table_off;
    h.table_mode = table_shape((const char *)table.buf, n_columns, &h.t_base, &h.t_stride,
                               &h.t_nbytes);
    h.header_len = (uint64_t)header.len;
    h.out_table_offset = out_table_off;
    h.n_kept = n_kept;
    h.out_table_mode = table_shape((const char *)header.buf + out_table_off, n_kept, &h.o_base,
                                   &h.o_stride, &h.o_nbytes);
    h.out_meta_offset = out_meta;
    h.n_runs = (uint64_t)n_runs;
    h.n_missing = n_missing;
    uint64_t table_copy = h.table_mode == TABLE_BYTES ? (uint64_t)table.len : 0;
    h.table_at = sizeof h;
    h.header_at = h.table_at + round8(table_copy);
    h.runs_at = h.header_at + round8((uint64_t)header.len);
    h.blob_len = h.runs_at + 8 * (uint64_t)n_runs;
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)h.blob_len);
    if (result == NULL) {
        goto done;
    }
    char *b = PyBytes_AS_STRING(result);
    memset(b, 0, (size_t)h.blob_len);
    memcpy(b, &h, sizeof h);
    memcpy(b + h.table_at, table.buf, (size_t)table_copy);
    memcpy(b + h.header_at, header.buf, (size_t)header.len);
    uint32_t *packed = (uint32_t *)(b + h.runs_at);
    for (Py_ssize_t i = 0; i < n_runs; i++) {
        packed[2 * i] = (uint32_t)(r[3 * i] / 64);
        packed[2 * i + 1] = (uint32_t)r[3 * i + 2];
    }
done:
    PyBuffer_Release(&runs);
    PyBuffer_Release(&header);
    PyBuffer_Release(&table);
    return result;
}

/* Copy packed runs to [d, d_end), consecutively (see plan_head), prefetching ahead as
 * copy_runs_loop does; first run first, or (backwards) last run first.
 *
 * fast_trim alternates the two orders from call to call.  When consecutive trims read the
 * same frame (a fan-out to several targets, or the benchmark's steady state) and the
 * frame plus the output outgrow the L2 cache, a copy in one fixed order always finds its
 * next bytes evicted (the access pattern is cyclic); alternating the order starts each
 * copy where the previous one ended, in what is still cached.  Measured on the dev VM
 * (2 MB L2) for the 1.7 MB benchmark frame: ~10% faster whole trims. */
static void
copy_packed_runs(char *d, char *d_end, const char *s, const uint32_t *r, uint64_t n_runs,
                 int backwards)
{
    if (!backwards) {
        for (uint64_t i = 0; i < n_runs; i++) {
            if (i + PREFETCH_AHEAD < n_runs) {
                const char *next = s + 64 * (uint64_t)r[2 * (i + PREFETCH_AHEAD)];
                for (int k = 0; k < PREFETCH_LINES; k++) {
                    PREFETCH(next + 64 * k);
                }
            }
            copy_run(d, s + 64 * (uint64_t)r[2 * i], r[2 * i + 1]);
            d += r[2 * i + 1];
        }
        return;
    }
    for (uint64_t i = n_runs; i-- > 0;) {
        if (i >= PREFETCH_AHEAD) {
            const char *next = s + 64 * (uint64_t)r[2 * (i - PREFETCH_AHEAD)];
            for (int k = 0; k < PREFETCH_LINES; k++) {
                PREFETCH(next + 64 * k);
            }
        }
        d_end -= r[2 * i + 1];
        copy_run(d_end, s + 64 * (uint64_t)r[2 * i], r[2 * i + 1]);
    }
}

/* Which order the next fast_trim copies in; read and flipped only while holding the GIL. */
static int copy_backwards = 0;

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

static PyObject *
fast_trim(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyDict_Check(args[0]) || !PyType_Check(args[4])
        || !PyType_IsSubtype((PyTypeObject *)args[4], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError,
                        "fast_trim(cache: dict, src, out, digest: int, result_type: tuple type)");
        return NULL;
    }
    PyObject *cache = args[0], *src_obj = args[1], *out_obj = args[2];
    unsigned long long digest = PyLong_AsUnsignedLongLong(args[3]);
    if (digest == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* not a u64 digest: never cached, the general path serves it */
        Py_RETURN_NONE;
    }
    Py_buffer src;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* the general path words the error */
        Py_RETURN_NONE;
    }
    PyObject *entry = NULL, *result = NULL, *data = NULL, *out_new = NULL;
    const char *s = (const char *)src.buf;
    const Py_ssize_t n = src.len;

    /* Preamble, as read_preamble checks it. */
    if (n < FRAME_PREAMBLE_SIZE || memcmp(s, "FTRM", 4) != 0 || load_le(s + 4, 2) != 1
        || load_le(s + 6, 2) != 0 || load_le(s + 28, 4) != 0 || load_le(s + 52, 8) != 0
        || load_le(s + 60, 4) != 0 || load_le(s + 32, 8) != (uint64_t)n) {
        goto miss;
    }
    uint64_t n_columns = load_le(s + 8, 4), layout_len = load_le(s + 12, 4);
    uint64_t n_cand = load_le(s + 24, 4), meta_off = load_le(s + 40, 8);
    uint64_t meta_len = load_le(s + 48, 4);
    if (meta_off > (uint64_t)n || meta_len != (uint64_t)n - meta_off) {
        goto miss;
    }
    char keybuf[FAST_KEY_SIZE];
    memcpy(keybuf, s + 16, 8); /* the layout hint, as on the wire (LE) */
    store_le(keybuf + 8, digest, 8);
    store_le(keybuf + 16, n_cand, 8);
    store_le(keybuf + 24, meta_off, 8);
    PyObject *key = PyBytes_FromStringAndSize(keybuf, FAST_KEY_SIZE);
    if (key == NULL) {
        goto done;
    }
    entry = PyDict_GetItemWithError(cache, key);
    Py_DECREF(key);
    if (entry == NULL) {
        if (PyErr_Occurred()) {
            goto done;
        }
        goto miss;
    }
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2
        || !PyBytes_CheckExact(PyTuple_GET_ITEM(entry, 0))
        || !PyBytes_CheckExact(PyTuple_GET_ITEM(entry, 1))
        || PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 1)) < (Py_ssize_t)sizeof(plan_head)) {
        PyErr_SetString(PyExc_TypeError, "fast_trim: cache entries must be (bytes, plan blob)");
        entry = NULL;
        goto done;
    }
    Py_INCREF(entry); /* the cache may drop it while the GIL is released below */
    PyObject *layout = PyTuple_GET_ITEM(entry, 0);
    const char *blob = PyBytes_AS_STRING(PyTuple_GET_ITEM(entry, 1));
    plan_head h;
    memcpy(&h, blob, sizeof h);
    if (h.magic != PLAN_MAGIC
        || (uint64_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 1)) != h.blob_len) {
        PyErr_SetString(PyExc_TypeError, "fast_trim: not a pack_plan blob");
        goto done;
    }

    /* Everything that decides what is copied must equal the plan's.  meta_off equals the
     * plan's (it is in the key, and checked), so the plan's table and runs lie inside src
     * (pack_plan checked them against it). */
    if (h.n_columns != n_columns || h.layout_len != layout_len || h.n_candidates != n_cand
        || h.meta_offset != meta_off || (uint64_t)PyBytes_GET_SIZE(layout) != layout_len
        || bytes_differ(s + FRAME_PREAMBLE_SIZE, PyBytes_AS_STRING(layout), (size_t)layout_len)) {
        goto miss;
    }
    const char *table = s + h.table_offset;
    if (h.table_mode == TABLE_UNIFORM
            ? uniform_table_differs(table, n_columns, h.t_base, h.t_stride, h.t_nbytes) != 0
            : bytes_differ(table, blob + h.table_at, 16 * (size_t)n_columns)) {
        goto miss;
    }

    /* The output: a memoryview of out (a new bytearray for None) with exactly out_len
     * bytes, written through that view's own buffer. */
    const uint64_t out_len = h.out_meta_offset + meta_len;
    if (out_obj == Py_None) {
        out_new = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)out_len);
        if (out_new == NULL) {
            goto done;
        }
        out_obj = out_new;
    }
    else if (!PyObject_CheckBuffer(out_obj)) {
        goto miss;
    }
    data = PyMemoryView_FromObject(out_obj);
    if (data == NULL) {
        PyErr_Clear();
        goto miss;
    }
    Py_buffer *view = PyMemoryView_GET_BUFFER(data);
    if (view->readonly || view->ndim != 1 || (view->format != NULL && strcmp(view->format, "B") != 0)
        || !PyBuffer_IsContiguous(view, 'C') || (uint64_t)view->len < out_len) {
        goto miss;
    }
    if ((uint64_t)view->len != out_len) {
        Py_SETREF(data, PySequence_GetSlice(data, 0, (Py_ssize_t)out_len));
        if (data == NULL) {
            goto done;
        }
        view = PyMemoryView_GET_BUFFER(data);
    }

    /* Write: header (its table generated when uniform), the per-request preamble fields,
     * the runs, the metadata. */
    char *d = (char *)view->buf;
    const char *header = blob + h.header_at;
    if (h.out_table_mode == TABLE_UNIFORM) {
        uint64_t ot = h.out_table_offset, ot_end = ot + 16 * h.n_kept;
        memcpy(d, header, (size_t)ot);
        write_uniform_table(d + ot, h.n_kept, h.o_base, h.o_stride, h.o_nbytes);
        memcpy(d + ot_end, header + ot_end, (size_t)(h.header_len - ot_end));
    }
    else {
        memcpy(d, header, (size_t)h.header_len);
    }
    store_le(d + FRAME_TAIL_OFFSET, out_len, 8);
    store_le(d + FRAME_TAIL_OFFSET + 8, h.out_meta_offset, 8);
    store_le(d + FRAME_TAIL_OFFSET + 16, meta_len, 4);
    const uint32_t *runs = (const uint32_t *)(blob + h.runs_at);
    char *data_start = d + h.header_len, *data_end = d + h.out_meta_offset;
    int backwards = copy_backwards;
    copy_backwards = !backwards;
    if (h.out_meta_offset - h.header_len >= RELEASE_GIL_MIN_BYTES) {
        /* src, the view and the entry are all held: nothing moves or goes away. */
        Py_BEGIN_ALLOW_THREADS
        copy_packed_runs(data_start, data_end, s, runs, h.n_runs, backwards);
        Py_END_ALLOW_THREADS
    }
    else {
        copy_packed_runs(data_start, data_end, s, runs, h.n_runs, backwards);
    }
    memcpy(d + h.out_meta_offset, s + meta_off, (size_t)meta_len);
    result = make_result((PyTypeObject *)args[4], data, n, (Py_ssize_t)out_len, h.n_kept,
                         h.n_missing);
    goto done;
miss:
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(data);
    Py_XDECREF(out_new);
    Py_XDECREF(entry);
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
    {"pack_plan", pack_plan, METH_VARARGS,
     "pack_plan(n_columns, layout_len, n_candidates, meta_offset, table_offset, table, header, "
     "runs, out_meta_offset, n_kept, n_missing) -> bytes: a checked plan blob for fast_trim."},
    {"fast_trim", (PyCFunction)(void (*)(void))fast_trim, METH_FASTCALL,
     "fast_trim(cache, src, out, digest, result_type) -> result or None: one steady-state "
     "trim."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "root_worker.frame._copyruns",
    "Bounds-checked byte-run copy for the frame trim engine (optional accelerator).", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__copyruns(void)
{
    detect_cpu();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "KERNEL", kernel_names[kernel]) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
