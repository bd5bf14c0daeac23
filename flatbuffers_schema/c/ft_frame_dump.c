/* ft_frame_dump: the C reader's test driver (tests/test_c_reader.py builds and runs it).
 *
 *   ft_frame_dump frames < paths     one frame file path per line; for each, prints
 *       "frame PATH", then "ok N_CANDIDATES N_COLUMNS META_B2B" and one line per column
 *       "col NAME_HEX DTYPE KIND DIMS N_VALUES VALUES_B2B OFFSETS_B2B" (DIMS "2x3" or "-",
 *       OFFSETS_B2B "-" for dense), or "error CLASS COLUMN MESSAGE".
 *   ft_frame_dump keys < names       one hex-encoded UTF-8 name per line; prints
 *       "KEY_HEX DIGEST_HEX" (ft_name_key as a u64, and the 8 digest bytes).
 *
 * B2B is BLAKE2b with an 8-byte digest, in hex, of the bytes as on the wire. Exit code 0
 * unless the driver itself fails (unreadable file, ft_frame_find disagreeing).
 */
#define FT_FRAME_IMPLEMENTATION
#include "ft_frame.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FILE_BYTES (64u << 20)
#define MAX_LINE 8192

static const char *const DTYPE_NAMES[13] = {
    "?", "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64"};

static void print_hex(const uint8_t *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) printf("%02x", p[i]);
}

static void print_b2b(const void *p, size_t n) {
    uint8_t d[8];
    ft_blake2b(d, sizeof d, p, n);
    print_hex(d, sizeof d);
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    unsigned char *buf;
    size_t cap = 1 << 16, n = 0, got;
    if (!fp) return NULL;
    buf = (unsigned char *)malloc(cap);
    while (buf && (got = fread(buf + n, 1, cap - n, fp)) > 0) {
        n += got;
        if (n == cap) {
            unsigned char *bigger;
            if (cap >= MAX_FILE_BYTES) { free(buf); buf = NULL; break; }
            bigger = (unsigned char *)realloc(buf, cap * 2);
            if (!bigger) { free(buf); buf = NULL; break; }
            buf = bigger;
            cap *= 2;
        }
    }
    fclose(fp);
    *len = n;
    return buf;
}

static int dump_columns(const ft_frame *f) {
    uint32_t i;
    uint8_t d;
    for (i = 0; i < f->n_columns; i++) {
        const ft_column *c = &f->columns[i];
        if (ft_frame_find(f, c->name, c->name_len) != c) return 1;
        printf("col ");
        print_hex((const uint8_t *)c->name, c->name_len);
        printf(" %s %s ", DTYPE_NAMES[c->dtype], c->kind == FT_RAGGED ? "ragged" : "dense");
        if (!c->ndim) printf("-");
        for (d = 0; d < c->ndim; d++) printf(d ? "x%u" : "%u", (unsigned)c->dims[d]);
        printf(" %llu ", (unsigned long long)c->n_values);
        print_b2b(c->data, (size_t)c->data_bytes);
        printf(" ");
        if (c->kind == FT_RAGGED) print_b2b(c->offsets, 8 * ((size_t)f->n_candidates + 1));
        else printf("-");
        printf("\n");
    }
    return ft_frame_find(f, "\xff", 1) != NULL; /* no valid name is a lone 0xff byte */
}

static int dump_frame(const char *path) {
    size_t len = 0;
    unsigned char *buf = read_file(path, &len);
    ft_frame f;
    ft_error err;
    int bad = 0;
    if (!buf) { fprintf(stderr, "ft_frame_dump: cannot read %s\n", path); return 1; }
    printf("frame %s\n", path);
    if (ft_frame_open(&f, buf, len, &err) == FT_OK) {
        printf("ok %u %u ", f.n_candidates, f.n_columns);
        print_b2b(f.meta, f.meta_len);
        printf("\n");
        bad = dump_columns(&f);
        ft_frame_close(&f);
    } else {
        printf("error %s %ld %s\n", ft_status_name(err.status), err.column, err.message);
    }
    free(buf);
    return bad;
}

static int unhex(const char *s, unsigned char *out, size_t *n) {
    size_t i, len = strlen(s);
    if (len % 2) return 0;
    for (i = 0; i < len / 2; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) return 0;
        out[i] = (unsigned char)v;
    }
    *n = len / 2;
    return 1;
}

int main(int argc, char **argv) {
    static char line[MAX_LINE];
    static unsigned char name[MAX_LINE / 2];
    int keys, rc = 0;
    if (argc != 2 || (strcmp(argv[1], "frames") && strcmp(argv[1], "keys"))) {
        fprintf(stderr, "usage: ft_frame_dump frames|keys < input\n");
        return 2;
    }
    keys = strcmp(argv[1], "keys") == 0;
    while (fgets(line, sizeof line, stdin)) {
        size_t n = strcspn(line, "\r\n");
        line[n] = 0;
        if (keys) {
            uint8_t d[8];
            if (!unhex(line, name, &n)) { fprintf(stderr, "bad hex: %s\n", line); return 1; }
            ft_blake2b(d, sizeof d, name, n);
            printf("%016llx ", (unsigned long long)ft_name_key((const char *)name, n));
            print_hex(d, sizeof d);
            printf("\n");
        } else if (n) {
            rc |= dump_frame(line);
        }
    }
    return rc;
}
