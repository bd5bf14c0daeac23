/* ft_frame.h -- a single-header C99 reader of feature-trimmer frames (version 1), and the
 * stable 64-bit name key (BLAKE2b with an 8-byte digest) for roots and leaves in C/C++.
 *
 * The byte layout and every rule checked here are specified in docs/frame-format.md; this
 * reader validates exactly what that page lists, in the same stage order as the reference
 * decoder (root_worker/frame/codec.py), so both accept and reject the same frames
 * (tests/test_c_reader.py runs both over the golden vectors in tests/data/golden/ and over
 * thousands of corrupted frames).
 *
 * Use: in exactly one .c file
 *     #define FT_FRAME_IMPLEMENTATION
 *     #include "ft_frame.h"
 * and include it without the define elsewhere.
 *
 *     ft_frame f; ft_error err;
 *     if (ft_frame_open(&f, buf, len, &err) != FT_OK) { fprintf(stderr, "%s\n", err.message); }
 *     const ft_column *c = ft_frame_find(&f, "ctr_7d", 6);   // NULL when absent
 *     if (c && c->kind == FT_DENSE && c->dtype == FT_FLOAT32) { const float *x = c->data; }
 *     ft_frame_close(&f);
 *
 * Zero copy: column data, names and metadata point into the caller's buffer, which must
 * outlive the ft_frame. Values are little-endian as on the wire (use them directly on
 * little-endian hosts; byte-swap on big-endian ones); ragged offsets are read with
 * ft_ragged_offset(), which is endian- and alignment-safe. Pointers are 64-byte aligned
 * when the buffer is. The reader never reads outside [buf, buf + len), never trusts a
 * declared size before checking it against len, allocates O(n_columns + metadata keys)
 * (bounded by len) and is reentrant (no global state).
 *
 * Metadata: validated as UTF-8 strict RFC 8259 JSON, one object, with the frame format's
 * extra rules (no duplicate keys after unescaping, no lone surrogate escapes, numbers finite
 * as IEEE doubles, integers of at most 4300 digits, nesting at most 128 deep). It is exposed
 * as bytes (f.meta, f.meta_len) for the JSON library of your choice.
 *
 * License: Apache-2.0, as the project.
 */
#ifndef FT_FRAME_H
#define FT_FRAME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FT_FRAME_VERSION 1
#define FT_PREAMBLE_SIZE 64
#define FT_BLOCK_ALIGN 64
#define FT_MAX_NDIM 4
#define FT_MAX_META_DEPTH 128
#define FT_MAX_META_INT_DIGITS 4300

/* Which stage rejected a frame (docs/frame-format.md, "Validation"). */
typedef enum {
    FT_OK = 0,
    FT_ERR_PREAMBLE = 1, /* magic, version, flags, reserved, frame_len, section bounds */
    FT_ERR_LAYOUT = 2,   /* column records, section size, names, dtype codes, dims */
    FT_ERR_TABLE = 3,    /* block alignment, order, overlap, bounds, exact sizes */
    FT_ERR_RAGGED = 4,   /* ragged offsets: start, monotonic, end */
    FT_ERR_VALUE = 5,    /* a bool byte other than 0 or 1 */
    FT_ERR_METADATA = 6, /* UTF-8, strict JSON, an object */
    FT_ERR_ARG = 7,      /* NULL arguments */
    FT_ERR_NOMEM = 8     /* allocation failed */
} ft_status;

typedef enum {
    FT_BOOL = 1, FT_INT8 = 2, FT_INT16 = 3, FT_INT32 = 4, FT_INT64 = 5, FT_UINT8 = 6,
    FT_UINT16 = 7, FT_UINT32 = 8, FT_UINT64 = 9, FT_FLOAT16 = 10, FT_FLOAT32 = 11,
    FT_FLOAT64 = 12
} ft_dtype;

enum { FT_DENSE = 0, FT_RAGGED = 1 };

typedef struct {
    const char *name;      /* UTF-8, NOT NUL-terminated, name_len bytes */
    size_t name_len;
    uint8_t dtype;         /* ft_dtype */
    uint8_t kind;          /* FT_DENSE or FT_RAGGED */
    uint8_t ndim;          /* dims of one element: a candidate's value (dense), a list item */
    uint32_t dims[FT_MAX_NDIM];
    size_t itemsize;       /* bytes of one scalar of dtype */
    uint64_t elem_size;    /* itemsize * prod(dims) */
    const void *data;      /* dense: n_candidates elements; ragged: n_values elements */
    uint64_t data_bytes;
    const uint8_t *offsets; /* ragged: int64 LE offsets[n_candidates + 1]; else NULL */
    uint64_t n_values;     /* ragged: number of list items; dense: n_candidates */
} ft_column;

typedef struct {
    uint32_t n_columns;
    uint32_t n_candidates;
    const uint8_t *meta;   /* UTF-8 JSON object, meta_len bytes, NOT NUL-terminated */
    size_t meta_len;
    ft_column *columns;    /* n_columns entries, in wire order */
    uint32_t *by_name;     /* column indexes sorted by name bytes (ft_frame_find) */
} ft_frame;

typedef struct {
    ft_status status;
    long column;           /* the column at fault, or -1 */
    char message[192];
} ft_error;

/* Validate buf[0:len) completely; on FT_OK fill *f (free with ft_frame_close). On error
 * *f is left empty (safe to close) and *err (if not NULL) says what and where. */
ft_status ft_frame_open(ft_frame *f, const void *buf, size_t len, ft_error *err);
void ft_frame_close(ft_frame *f);
/* The column named name[0:len) (exact bytes), or NULL. O(log n_columns). */
const ft_column *ft_frame_find(const ft_frame *f, const char *name, size_t len);
/* Ragged offset i (0 <= i <= n_candidates) of a ragged column. */
int64_t ft_ragged_offset(const ft_column *c, uint64_t i);
const char *ft_status_name(ft_status s);

/* BLAKE2b (RFC 7693), unkeyed, with a digest of outlen bytes (1..64). */
void ft_blake2b(uint8_t *out, size_t outlen, const void *in, size_t inlen);
/* The stable name key: BLAKE2b(name, digest_size=8) read as a little-endian uint64.
 * NOTE: not BLAKE2b-512 truncated (the digest size is a parameter of BLAKE2b). With
 * libsodium: crypto_generichash(out, 8, name, len, NULL, 0), then read out as LE.
 * ft_name_key("ads_ctr", 7) == 0x658c2cd590d7a4deULL. */
uint64_t ft_name_key(const char *name, size_t len);

#ifdef __cplusplus
}
#endif
#endif /* FT_FRAME_H */

/* ======================================================================================= */
#ifdef FT_FRAME_IMPLEMENTATION
#ifndef FT_FRAME_IMPLEMENTATION_DONE
#define FT_FRAME_IMPLEMENTATION_DONE

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- little-endian loads (any alignment, any host) ---- */
static uint16_t ft__u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t ft__u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}
static uint64_t ft__u64(const uint8_t *p) {
    return (uint64_t)ft__u32(p) | ((uint64_t)ft__u32(p + 4) << 32);
}

/* ---- BLAKE2b, RFC 7693 ---- */
static const uint64_t ft__b2_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
    0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
static const uint8_t ft__b2_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

#define FT__ROTR64(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
#define FT__G(a, b, c, d, x, y)                                                           \
    do {                                                                                  \
        v[a] = v[a] + v[b] + (x); v[d] = FT__ROTR64(v[d] ^ v[a], 32);                     \
        v[c] = v[c] + v[d];       v[b] = FT__ROTR64(v[b] ^ v[c], 24);                     \
        v[a] = v[a] + v[b] + (y); v[d] = FT__ROTR64(v[d] ^ v[a], 16);                     \
        v[c] = v[c] + v[d];       v[b] = FT__ROTR64(v[b] ^ v[c], 63);                     \
    } while (0)

static void ft__b2_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t v[16], m[16];
    int i;
    for (i = 0; i < 16; i++) m[i] = ft__u64(block + 8 * i);
    for (i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = ft__b2_iv[i]; }
    v[12] ^= t; /* the low word of the byte counter; inputs stay far below 2^64 bytes */
    if (last) v[14] = ~v[14];
    for (i = 0; i < 12; i++) {
        const uint8_t *s = ft__b2_sigma[i];
        FT__G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        FT__G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        FT__G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        FT__G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        FT__G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        FT__G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        FT__G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        FT__G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

void ft_blake2b(uint8_t *out, size_t outlen, const void *in, size_t inlen) {
    const uint8_t *p = (const uint8_t *)in;
    uint64_t h[8];
    uint8_t block[128];
    uint64_t t = 0;
    size_t i;
    if (outlen < 1 || outlen > 64) return;
    for (i = 0; i < 8; i++) h[i] = ft__b2_iv[i];
    h[0] ^= 0x01010000ULL ^ (uint64_t)outlen; /* depth 1, fanout 1, no key, digest length */
    while (inlen > 128) { /* every full block but the last is compressed as non-final */
        t += 128;
        ft__b2_compress(h, p, t, 0);
        p += 128;
        inlen -= 128;
    }
    memset(block, 0, sizeof block);
    if (inlen) memcpy(block, p, inlen);
    t += inlen;
    ft__b2_compress(h, block, t, 1);
    for (i = 0; i < outlen; i++) out[i] = (uint8_t)(h[i / 8] >> (8 * (i % 8)));
}

uint64_t ft_name_key(const char *name, size_t len) {
    uint8_t d[8];
    ft_blake2b(d, sizeof d, name, len);
    return ft__u64(d);
}

/* ---- errors ---- */
static ft_status ft__fail(ft_error *err, ft_status s, long column, const char *fmt, ...) {
    if (err) {
        va_list ap;
        err->status = s;
        err->column = column;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return s;
}

const char *ft_status_name(ft_status s) {
    switch (s) {
    case FT_OK: return "ok";
    case FT_ERR_PREAMBLE: return "preamble";
    case FT_ERR_LAYOUT: return "layout";
    case FT_ERR_TABLE: return "table";
    case FT_ERR_RAGGED: return "ragged";
    case FT_ERR_VALUE: return "value";
    case FT_ERR_METADATA: return "metadata";
    case FT_ERR_ARG: return "argument";
    case FT_ERR_NOMEM: return "nomem";
    }
    return "unknown";
}

/* ---- UTF-8: exactly the well-formed sequences of Unicode (no overlongs, no surrogates,
 * nothing above U+10FFFF); returns the length of the sequence at p, 0 if ill-formed. */
static size_t ft__utf8_seq(const uint8_t *p, size_t n, uint32_t *cp) {
    uint8_t b = p[0];
    uint8_t lo = 0x80, hi = 0xBF;
    size_t len, i;
    uint32_t c;
    if (b < 0x80) { *cp = b; return 1; }
    if (b >= 0xC2 && b <= 0xDF) { len = 2; c = b & 0x1F; }
    else if (b >= 0xE0 && b <= 0xEF) {
        len = 3; c = b & 0x0F;
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        len = 4; c = b & 0x07;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F;
    } else return 0;
    if (n < len) return 0;
    for (i = 1; i < len; i++) {
        uint8_t x = p[i];
        if (x < (i == 1 ? lo : 0x80) || x > (i == 1 ? hi : 0xBF)) return 0;
        c = (c << 6) | (x & 0x3F);
    }
    *cp = c;
    return len;
}

static int ft__utf8_valid(const uint8_t *p, size_t n, size_t *bad_at) {
    size_t i = 0;
    uint32_t cp;
    while (i < n) {
        size_t k;
        if (p[i] < 0x80) { i++; continue; }
        k = ft__utf8_seq(p + i, n - i, &cp);
        if (!k) { *bad_at = i; return 0; }
        i += k;
    }
    return 1;
}

/* ---- strict JSON (RFC 8259 + the frame format's rules) ---- */
typedef struct { const uint8_t *p; size_t n; } ft__span; /* a key's raw bytes, no quotes */

typedef struct {
    const uint8_t *s, *end, *at;
    ft__span *keys;
    size_t n_keys, cap_keys;
    const char *why;
    int nomem;
} ft__json;

static int ft__json_err(ft__json *j, const char *why) { j->why = why; return 0; }
static void ft__ws(ft__json *j) {
    while (j->at < j->end && (*j->at == ' ' || *j->at == '\t' || *j->at == '\n' ||
                              *j->at == '\r'))
        j->at++;
}
static int ft__hex4(const uint8_t *p, uint32_t *v) {
    int i;
    *v = 0;
    for (i = 0; i < 4; i++) {
        uint8_t c = p[i];
        uint32_t d;
        if (c >= '0' && c <= '9') d = (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') d = (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') d = (uint32_t)(c - 'A' + 10);
        else return 0;
        *v = (*v << 4) | d;
    }
    return 1;
}

/* Next code point of a validated string body (escapes decoded, pairs combined). */
static uint32_t ft__next_cp(const uint8_t **pp) {
    const uint8_t *p = *pp;
    uint32_t cp, lo;
    if (*p != '\\') {
        size_t k = ft__utf8_seq(p, 4, &cp); /* validated: the sequence is complete */
        *pp = p + (k ? k : 1);
        return cp;
    }
    switch (p[1]) {
    case 'b': *pp = p + 2; return 8;
    case 'f': *pp = p + 2; return 12;
    case 'n': *pp = p + 2; return 10;
    case 'r': *pp = p + 2; return 13;
    case 't': *pp = p + 2; return 9;
    case 'u':
        ft__hex4(p + 2, &cp);
        if (cp >= 0xD800 && cp <= 0xDBFF) { /* validated: a low surrogate escape follows */
            ft__hex4(p + 8, &lo);
            *pp = p + 12;
            return 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        *pp = p + 6;
        return cp;
    default: *pp = p + 2; return p[1]; /* " \ / */
    }
}

static int ft__key_cmp(const void *a, const void *b) {
    const ft__span *x = (const ft__span *)a, *y = (const ft__span *)b;
    const uint8_t *p = x->p, *q = y->p, *pe = x->p + x->n, *qe = y->p + y->n;
    while (p < pe && q < qe) {
        uint32_t c = ft__next_cp(&p), d = ft__next_cp(&q);
        if (c != d) return c < d ? -1 : 1;
    }
    return (p < pe) - (q < qe);
}

static int ft__string(ft__json *j, ft__span *out) {
    const uint8_t *start = ++j->at; /* after the opening quote */
    while (j->at < j->end) {
        uint8_t c = *j->at;
        if (c == '"') {
            if (out) { out->p = start; out->n = (size_t)(j->at - start); }
            j->at++;
            return 1;
        }
        if (c < 0x20) return ft__json_err(j, "control character in a string");
        if (c != '\\') { j->at++; continue; }
        if (j->end - j->at < 2) break;
        c = j->at[1];
        if (c == 'u') {
            uint32_t v, lo;
            if (j->end - j->at < 6 || !ft__hex4(j->at + 2, &v))
                return ft__json_err(j, "bad \\u escape");
            j->at += 6;
            if (v >= 0xDC00 && v <= 0xDFFF)
                return ft__json_err(j, "a \\u escape encodes a lone UTF-16 surrogate");
            if (v >= 0xD800 && v <= 0xDBFF) {
                if (j->end - j->at < 6 || j->at[0] != '\\' || j->at[1] != 'u' ||
                    !ft__hex4(j->at + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                    return ft__json_err(j, "a \\u escape encodes a lone UTF-16 surrogate");
                j->at += 6;
            }
        } else if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' ||
                   c == 'r' || c == 't') {
            j->at += 2;
        } else {
            return ft__json_err(j, "invalid escape");
        }
    }
    return ft__json_err(j, "unterminated string");
}

/* The smallest significand (digits of d.ddd x 10^308) that rounds to infinity: the
 * midpoint between DBL_MAX and 2^1024, exactly (trailing zeros dropped). */
static const char ft__overflow_digits[] =
    "1797693134862315807937289714053034150799341327100378269361737789804449682927647509466"
    "4901797758720709633028641669288791094655554785194040263065748867150582068190890200070"
    "8383676273854845817711531764475730270069855571366959622842914819860834936475292719074"
    "168444365510704342711559699508093042880177904174497792";

/* Whether the number's significant digits (int part then fraction, leading zeros
 * skipped) at decimal exponent 308 reach the overflow midpoint. */
static int ft__at_or_above_mid(const uint8_t *ip, size_t in, const uint8_t *fp, size_t fn) {
    size_t k = 0, i;
    int started = 0;
    const size_t m = sizeof ft__overflow_digits - 1;
    for (i = 0; i < in + fn; i++) {
        uint8_t c = i < in ? ip[i] : fp[i - in];
        if (!started && c == '0') continue;
        started = 1;
        if (k == m) return 1; /* equal so far and longer: c > 0 somewhere or equal */
        if (c != (uint8_t)ft__overflow_digits[k]) return c > (uint8_t)ft__overflow_digits[k];
        k++;
    }
    return k == m; /* shorter means below (the midpoint has no trailing zeros) */
}

static int ft__number(ft__json *j) {
    const uint8_t *ip, *fp = NULL;
    size_t in, fn = 0;
    long long e = 0, pos10;
    int neg_e = 0, has_frac = 0, has_exp = 0;
    size_t i;
    if (j->at < j->end && *j->at == '-') j->at++;
    ip = j->at;
    if (j->at >= j->end || *j->at < '0' || *j->at > '9') return ft__json_err(j, "bad number");
    if (*j->at == '0') j->at++;
    else while (j->at < j->end && *j->at >= '0' && *j->at <= '9') j->at++;
    in = (size_t)(j->at - ip);
    if (j->at < j->end && *j->at == '.') {
        has_frac = 1;
        fp = ++j->at;
        while (j->at < j->end && *j->at >= '0' && *j->at <= '9') j->at++;
        fn = (size_t)(j->at - fp);
        if (!fn) return ft__json_err(j, "bad number fraction");
    }
    if (j->at < j->end && (*j->at == 'e' || *j->at == 'E')) {
        const uint8_t *ep;
        has_exp = 1;
        j->at++;
        if (j->at < j->end && (*j->at == '+' || *j->at == '-')) neg_e = *j->at++ == '-';
        ep = j->at;
        while (j->at < j->end && *j->at >= '0' && *j->at <= '9') {
            if (e < 100000000) e = e * 10 + (*j->at - '0'); /* saturates: far past any limit */
            j->at++;
        }
        if (j->at == ep) return ft__json_err(j, "bad number exponent");
        if (neg_e) e = -e;
    }
    if (!has_frac && !has_exp) {
        if (in > FT_MAX_META_INT_DIGITS) return ft__json_err(j, "integer with too many digits");
        return 1;
    }
    /* finite as a double: the decimal exponent of the first significant digit */
    for (i = 0; i < in && ip[i] == '0'; i++) {}
    if (i < in) pos10 = (long long)(in - i) - 1;
    else {
        for (i = 0; i < fn && fp[i] == '0'; i++) {}
        if (i == fn) return 1; /* zero */
        pos10 = -(long long)i - 1;
    }
    if (pos10 + e > 308 || (pos10 + e == 308 && ft__at_or_above_mid(ip, in, fp, fn)))
        return ft__json_err(j, "number overflows a 64-bit float");
    return 1;
}

static int ft__literal(ft__json *j, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(j->end - j->at) < n || memcmp(j->at, word, n) != 0)
        return ft__json_err(j, "unexpected character");
    j->at += n;
    return 1;
}

static int ft__value(ft__json *j, int depth, int *is_object);

static int ft__push_key(ft__json *j, ft__span key) {
    if (j->n_keys == j->cap_keys) {
        size_t cap = j->cap_keys ? 2 * j->cap_keys : 16;
        ft__span *k = (ft__span *)realloc(j->keys, cap * sizeof *k);
        if (!k) { j->nomem = 1; return ft__json_err(j, "out of memory"); }
        j->keys = k;
        j->cap_keys = cap;
    }
    j->keys[j->n_keys++] = key;
    return 1;
}

static int ft__object(ft__json *j, int depth) {
    size_t first = j->n_keys, i;
    ft__span key;
    j->at++;
    ft__ws(j);
    if (j->at < j->end && *j->at == '}') { j->at++; return 1; }
    for (;;) {
        ft__ws(j);
        if (j->at >= j->end || *j->at != '"') return ft__json_err(j, "expected a key");
        if (!ft__string(j, &key) || !ft__push_key(j, key)) return 0;
        ft__ws(j);
        if (j->at >= j->end || *j->at != ':') return ft__json_err(j, "expected ':'");
        j->at++;
        if (!ft__value(j, depth, NULL)) return 0;
        ft__ws(j);
        if (j->at < j->end && *j->at == ',') { j->at++; continue; }
        if (j->at < j->end && *j->at == '}') { j->at++; break; }
        return ft__json_err(j, "expected ',' or '}'");
    }
    qsort(j->keys + first, j->n_keys - first, sizeof *j->keys, ft__key_cmp);
    for (i = first + 1; i < j->n_keys; i++)
        if (ft__key_cmp(&j->keys[i - 1], &j->keys[i]) == 0)
            return ft__json_err(j, "duplicate key");
    j->n_keys = first;
    return 1;
}

static int ft__array(ft__json *j, int depth) {
    j->at++;
    ft__ws(j);
    if (j->at < j->end && *j->at == ']') { j->at++; return 1; }
    for (;;) {
        if (!ft__value(j, depth, NULL)) return 0;
        ft__ws(j);
        if (j->at < j->end && *j->at == ',') { j->at++; continue; }
        if (j->at < j->end && *j->at == ']') { j->at++; return 1; }
        return ft__json_err(j, "expected ',' or ']'");
    }
}

static int ft__value(ft__json *j, int depth, int *is_object) {
    ft__ws(j);
    if (j->at >= j->end) return ft__json_err(j, "expected a value");
    if (is_object) *is_object = *j->at == '{';
    switch (*j->at) {
    case '{':
    case '[':
        if (depth + 1 > FT_MAX_META_DEPTH) return ft__json_err(j, "nested too deeply");
        return *j->at == '{' ? ft__object(j, depth + 1) : ft__array(j, depth + 1);
    case '"': return ft__string(j, NULL);
    case 't': return ft__literal(j, "true");
    case 'f': return ft__literal(j, "false");
    case 'n': return ft__literal(j, "null");
    default:
        if (*j->at == '-' || (*j->at >= '0' && *j->at <= '9')) return ft__number(j);
        return ft__json_err(j, "unexpected character");
    }
}

static ft_status ft__check_metadata(const uint8_t *m, size_t n, ft_error *err) {
    ft__json j;
    size_t bad;
    int is_object = 0, ok;
    if (!ft__utf8_valid(m, n, &bad))
        return ft__fail(err, FT_ERR_METADATA, -1, "metadata is not valid UTF-8 (byte %zu)", bad);
    memset(&j, 0, sizeof j);
    j.s = j.at = m;
    j.end = m + n;
    ok = ft__value(&j, 0, &is_object);
    if (ok) {
        ft__ws(&j);
        if (j.at != j.end) ok = ft__json_err(&j, "extra data after the value");
        else if (!is_object) ok = ft__json_err(&j, "not an object");
    }
    free(j.keys);
    if (ok) return FT_OK;
    return ft__fail(err, j.nomem ? FT_ERR_NOMEM : FT_ERR_METADATA, -1,
                    "metadata is not valid JSON: %s at byte %zu", j.why,
                    (size_t)(j.at - j.s));
}

/* ---- preamble ---- */
typedef struct {
    uint32_t n_columns, layout_len, n_candidates, meta_len;
    uint64_t frame_len, meta_offset, table_offset, table_end;
} ft__pre;

static ft_status ft__preamble(const uint8_t *b, size_t len, ft__pre *p, ft_error *err) {
    size_t i;
    uint64_t layout_end;
    if (len < FT_PREAMBLE_SIZE)
        return ft__fail(err, FT_ERR_PREAMBLE, -1, "truncated preamble: %zu bytes", len);
    if (memcmp(b, "FTRM", 4) != 0) return ft__fail(err, FT_ERR_PREAMBLE, -1, "bad magic");
    if (ft__u16(b + 4) != FT_FRAME_VERSION)
        return ft__fail(err, FT_ERR_PREAMBLE, -1, "unsupported version %u", ft__u16(b + 4));
    if (ft__u16(b + 6) != 0) return ft__fail(err, FT_ERR_PREAMBLE, -1, "unknown flags");
    for (i = 28; i < 32; i++)
        if (b[i]) return ft__fail(err, FT_ERR_PREAMBLE, -1, "reserved byte %zu not zero", i);
    for (i = 52; i < 64; i++)
        if (b[i]) return ft__fail(err, FT_ERR_PREAMBLE, -1, "reserved byte %zu not zero", i);
    p->n_columns = ft__u32(b + 8);
    p->layout_len = ft__u32(b + 12);
    p->n_candidates = ft__u32(b + 24);
    p->frame_len = ft__u64(b + 32);
    p->meta_offset = ft__u64(b + 40);
    p->meta_len = ft__u32(b + 48);
    if (p->frame_len != (uint64_t)len)
        return ft__fail(err, FT_ERR_PREAMBLE, -1, "frame_len %llu != buffer length %zu",
                        (unsigned long long)p->frame_len, len);
    layout_end = FT_PREAMBLE_SIZE + (uint64_t)p->layout_len;
    if (layout_end > len)
        return ft__fail(err, FT_ERR_PREAMBLE, -1, "layout section runs past the end");
    if (8 * (uint64_t)p->n_columns > p->layout_len)
        return ft__fail(err, FT_ERR_PREAMBLE, -1, "n_columns exceeds the layout section");
    p->table_offset = (layout_end + 7) & ~(uint64_t)7;
    p->table_end = p->table_offset + 16 * (uint64_t)p->n_columns;
    if (p->table_end > len)
        return ft__fail(err, FT_ERR_PREAMBLE, -1, "block table runs past the end");
    if (p->meta_offset < p->table_end || p->meta_offset > len ||
        p->meta_len != len - p->meta_offset)
        return ft__fail(err, FT_ERR_PREAMBLE, -1,
                        "metadata must lie after the block table and end the frame");
    return FT_OK;
}

/* ---- layout ---- */
static const uint8_t ft__itemsize[13] = {0, 1, 1, 2, 4, 8, 1, 2, 4, 8, 2, 4, 8};
static int ft__name_cmp_cols(const ft_column *x, const ft_column *y) {
    size_t n = x->name_len < y->name_len ? x->name_len : y->name_len;
    int c = memcmp(x->name, y->name, n);
    if (c) return c;
    return (x->name_len > y->name_len) - (x->name_len < y->name_len);
}

/* Sorting column indexes by name needs the columns; C99 qsort has no context argument, so
 * the names are sorted with a small merge sort instead (reentrant, O(F log F)). */
static void ft__sort_names(ft_column *cols, uint32_t *idx, uint32_t *tmp, uint32_t n) {
    uint32_t width, i;
    for (width = 1; width < n; width *= 2) {
        for (i = 0; i < n; i += 2 * width) {
            uint32_t lo = i, mid = i + width < n ? i + width : n;
            uint32_t hi = i + 2 * width < n ? i + 2 * width : n, a = lo, b = mid, k = lo;
            while (a < mid && b < hi)
                tmp[k++] = ft__name_cmp_cols(&cols[idx[a]], &cols[idx[b]]) <= 0 ? idx[a++]
                                                                                 : idx[b++];
            while (a < mid) tmp[k++] = idx[a++];
            while (b < hi) tmp[k++] = idx[b++];
        }
        memcpy(idx, tmp, n * sizeof *idx);
    }
}

static ft_status ft__records(const uint8_t *lay, const ft__pre *p, ft_column *cols,
                             ft_error *err) {
    uint64_t ndims = 0, names = 0, declared;
    uint32_t i;
    for (i = 0; i < p->n_columns; i++) {
        const uint8_t *r = lay + 8 * (size_t)i;
        ft_column *c = &cols[i];
        c->dtype = r[0];
        c->kind = r[1];
        c->ndim = r[2];
        c->name_len = ft__u16(r + 4);
        if (c->kind > FT_RAGGED)
            return ft__fail(err, FT_ERR_LAYOUT, (long)i, "column %u: unknown kind %u", i, c->kind);
        if (c->ndim > FT_MAX_NDIM)
            return ft__fail(err, FT_ERR_LAYOUT, (long)i, "column %u: ndim %u", i, c->ndim);
        if (r[3] || ft__u16(r + 6))
            return ft__fail(err, FT_ERR_LAYOUT, (long)i, "column %u: reserved bytes", i);
        if (!c->name_len)
            return ft__fail(err, FT_ERR_LAYOUT, (long)i, "column %u: empty name", i);
        ndims += c->ndim;
        names += c->name_len;
    }
    declared = 8 * (uint64_t)p->n_columns + 4 * ndims + names;
    if (declared != p->layout_len)
        return ft__fail(err, FT_ERR_LAYOUT, -1, "layout section is %u bytes, records declare %llu",
                        p->layout_len, (unsigned long long)declared);
    return FT_OK;
}

static ft_status ft__types(const uint8_t *lay, const ft__pre *p, ft_column *cols,
                           ft_error *err) {
    const uint8_t *dims = lay + 8 * (size_t)p->n_columns;
    const uint8_t *name = dims;
    uint32_t i, d;
    for (i = 0; i < p->n_columns; i++) name += 4 * (size_t)cols[i].ndim;
    for (i = 0; i < p->n_columns; i++) {
        ft_column *c = &cols[i];
        size_t bad;
        c->name = (const char *)name;
        name += c->name_len;
        if (!ft__utf8_valid((const uint8_t *)c->name, c->name_len, &bad))
            return ft__fail(err, FT_ERR_LAYOUT, (long)i, "column %u: name is not UTF-8", i);
        if (c->dtype < 1 || c->dtype > 12)
            return ft__fail(err, FT_ERR_LAYOUT, (long)i, "column %u: dtype code %u", i, c->dtype);
        c->itemsize = ft__itemsize[c->dtype];
        c->elem_size = c->itemsize;
        for (d = 0; d < c->ndim; d++) {
            c->dims[d] = ft__u32(dims);
            dims += 4;
            if (!c->dims[d])
                return ft__fail(err, FT_ERR_LAYOUT, (long)i, "column %u: zero dimension", i);
            if (c->elem_size * c->dims[d] / c->dims[d] != c->elem_size ||
                c->elem_size * c->dims[d] > 0xFFFFFFFFULL)
                return ft__fail(err, FT_ERR_LAYOUT, (long)i, "column %u: element too large", i);
            c->elem_size *= c->dims[d];
        }
    }
    return FT_OK;
}

static ft_status ft__unique_names(ft_frame *f, ft_error *err) {
    uint32_t i, n = f->n_columns, *tmp;
    for (i = 0; i < n; i++) f->by_name[i] = i;
    tmp = (uint32_t *)malloc((n ? n : 1) * sizeof *tmp);
    if (!tmp) return ft__fail(err, FT_ERR_NOMEM, -1, "out of memory");
    ft__sort_names(f->columns, f->by_name, tmp, n);
    free(tmp);
    for (i = 1; i < n; i++) {
        if (ft__name_cmp_cols(&f->columns[f->by_name[i - 1]], &f->columns[f->by_name[i]]) == 0) {
            uint32_t a = f->by_name[i - 1], b = f->by_name[i];
            uint32_t later = a > b ? a : b;
            return ft__fail(err, FT_ERR_LAYOUT, (long)later, "column %u: duplicate name", later);
        }
    }
    return FT_OK;
}

/* ---- block table, ragged offsets, bool bytes ---- */
static ft_status ft__table(const uint8_t *b, const ft__pre *p, ft_column *cols, ft_error *err) {
    uint64_t prev_end = p->table_end, head;
    uint32_t i;
    head = (8 * ((uint64_t)p->n_candidates + 1) + 63) & ~(uint64_t)63;
    for (i = 0; i < p->n_columns; i++) {
        ft_column *c = &cols[i];
        uint64_t off = ft__u64(b + p->table_offset + 16 * (size_t)i);
        uint64_t nb = ft__u64(b + p->table_offset + 16 * (size_t)i + 8);
        if (off % FT_BLOCK_ALIGN)
            return ft__fail(err, FT_ERR_TABLE, (long)i, "column %u: block not aligned", i);
        if (off < p->table_end)
            return ft__fail(err, FT_ERR_TABLE, (long)i, "column %u: block in the header", i);
        if (off > p->meta_offset || nb > p->meta_offset - off)
            return ft__fail(err, FT_ERR_TABLE, (long)i, "column %u: block runs past data", i);
        if (off < prev_end)
            return ft__fail(err, FT_ERR_TABLE, (long)i, "column %u: block overlaps", i);
        prev_end = off + nb;
        if (c->kind == FT_DENSE) {
            if (nb != (uint64_t)p->n_candidates * c->elem_size)
                return ft__fail(err, FT_ERR_TABLE, (long)i, "column %u: dense size", i);
            c->data = b + off;
            c->n_values = p->n_candidates;
        } else {
            if (nb < head || (nb - head) % c->elem_size)
                return ft__fail(err, FT_ERR_TABLE, (long)i, "column %u: ragged size", i);
            c->offsets = b + off;
            c->data = b + off + head;
            c->n_values = (nb - head) / c->elem_size;
        }
        c->data_bytes = c->kind == FT_DENSE ? nb : nb - head;
    }
    return FT_OK;
}

int64_t ft_ragged_offset(const ft_column *c, uint64_t i) {
    return (int64_t)ft__u64(c->offsets + 8 * i);
}

static ft_status ft__ragged(const ft__pre *p, const ft_column *cols, ft_error *err) {
    uint32_t i;
    uint64_t k;
    for (i = 0; i < p->n_columns; i++) {
        const ft_column *c = &cols[i];
        int64_t prev;
        if (c->kind != FT_RAGGED) continue;
        prev = ft_ragged_offset(c, 0);
        if (prev != 0)
            return ft__fail(err, FT_ERR_RAGGED, (long)i, "column %u: offsets[0] != 0", i);
        for (k = 1; k <= p->n_candidates; k++) {
            int64_t o = ft_ragged_offset(c, k);
            if (o < prev)
                return ft__fail(err, FT_ERR_RAGGED, (long)i, "column %u: offsets decrease at "
                                "candidate %llu", i, (unsigned long long)k);
            prev = o;
        }
        if ((uint64_t)prev != c->n_values)
            return ft__fail(err, FT_ERR_RAGGED, (long)i, "column %u: offsets end at %lld, "
                            "%llu values", i, (long long)prev, (unsigned long long)c->n_values);
    }
    return FT_OK;
}

static ft_status ft__bools(const ft__pre *p, const ft_column *cols, ft_error *err) {
    uint32_t i;
    uint64_t k;
    for (i = 0; i < p->n_columns; i++) {
        const uint8_t *v = (const uint8_t *)cols[i].data;
        if (cols[i].dtype != FT_BOOL) continue;
        for (k = 0; k < cols[i].data_bytes; k++)
            if (v[k] > 1)
                return ft__fail(err, FT_ERR_VALUE, (long)i, "column %u: bool byte %llu is %u",
                                i, (unsigned long long)k, v[k]);
    }
    return FT_OK;
}

/* ---- open / close / find ---- */
void ft_frame_close(ft_frame *f) {
    if (!f) return;
    free(f->columns);
    free(f->by_name);
    memset(f, 0, sizeof *f);
}

ft_status ft_frame_open(ft_frame *f, const void *buf, size_t len, ft_error *err) {
    const uint8_t *b = (const uint8_t *)buf;
    ft__pre p = {0, 0, 0, 0, 0, 0, 0, 0};
    ft_status s;
    size_t n;
    if (err) { err->status = FT_OK; err->column = -1; err->message[0] = 0; }
    if (!f || (!buf && len)) return ft__fail(err, FT_ERR_ARG, -1, "NULL argument");
    memset(f, 0, sizeof *f);
    s = ft__preamble(b, len, &p, err);
    if (s) return s;
    n = p.n_columns ? p.n_columns : 1;
    f->columns = (ft_column *)calloc(n, sizeof *f->columns);
    f->by_name = (uint32_t *)calloc(n, sizeof *f->by_name);
    if (!f->columns || !f->by_name) {
        ft_frame_close(f);
        return ft__fail(err, FT_ERR_NOMEM, -1, "out of memory");
    }
    f->n_columns = p.n_columns;
    f->n_candidates = p.n_candidates;
    if (!(s = ft__records(b + FT_PREAMBLE_SIZE, &p, f->columns, err)) &&
        !(s = ft__types(b + FT_PREAMBLE_SIZE, &p, f->columns, err)) &&
        !(s = ft__unique_names(f, err)) && !(s = ft__table(b, &p, f->columns, err)) &&
        !(s = ft__ragged(&p, f->columns, err)) && !(s = ft__bools(&p, f->columns, err)) &&
        !(s = ft__check_metadata(b + p.meta_offset, p.meta_len, err))) {
        f->meta = b + p.meta_offset;
        f->meta_len = p.meta_len;
        return FT_OK;
    }
    ft_frame_close(f);
    return s;
}

const ft_column *ft_frame_find(const ft_frame *f, const char *name, size_t len) {
    uint32_t lo = 0, hi = f->n_columns;
    ft_column key;
    key.name = name;
    key.name_len = len;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        const ft_column *c = &f->columns[f->by_name[mid]];
        int cmp = ft__name_cmp_cols(c, &key);
        if (cmp == 0) return c;
        if (cmp < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

#endif /* FT_FRAME_IMPLEMENTATION_DONE */
#endif /* FT_FRAME_IMPLEMENTATION */
