/* _copyruns_kernels.h: part of _copyruns.c, which includes its parts once, in this order:
 * kernels, plan, request, parts (see its docstring).  This part: the copy and compare kernels,
 * byte-order helpers. */
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
__attribute__((target("avx2"))) static inline void
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

/* Software prefetch of the first lines of the run PREFETCH_AHEAD runs ahead: each run
 * starts a new source stream, which the hardware prefetchers pick up only after a few
 * misses.  Six runs ahead rather than two: on the AMD EPYC (Zen, AVX2, 512 KB L2) CI
 * machine, copying the dense benchmark's 471 runs (660 KB) from frames cycled out of L3
 * took 1.15-1.34x one memcpy of the same bytes at 2 runs ahead, 1.0-1.2x at 4-8 (a C
 * harness, three runs); lines per run mattered less (2, 4 or 8). */
#define PREFETCH_AHEAD 6
#define PREFETCH_LINES 4
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define PREFETCH(p) ((void)(p))
#endif

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
