/* _copyruns_plan.h: part of _copyruns.c, which includes its parts once, in this order:
 * kernels, plan, request, parts (see its docstring).  This part: plans (make_plan: opaque
 * Plan objects), the block-table and ragged checks, the memo. */
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

#define PLAN_MAGIC 0x344e414c504d5254ULL /* "TRMPLAN4" */
#define PLAN_KEY_SIZE 16                 /* "<QQ" (layout_hint, allowlist digest) */

/* One column of a plan: what its block must hold, and whether the output keeps it. */
typedef struct {
    uint32_t elem;  /* bytes per element: per candidate (dense), per value (ragged) */
    uint8_t ragged; /* 1 for a ragged column */
    uint8_t kept;   /* 1 if the allowlist keeps it */
    uint8_t slow;   /* 1 for a ragged column whose elem is not a power of two (a division) */
    uint8_t reserved;
} col_desc;

/* The head of a plan's blob (native byte order; private memory of its Plan object),
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

/* The table check's view of the columns: one uint64 per column at vec_at (8 bytes a column,
 * so a 2000-column plan's descriptors and the table it checks stay in L1), laid out so
 * that the check needs no per-column branch and few vector operations:
 *
 *   bit 63  DESC_RAGGED  a ragged column (the sign bit: blendv selects on it directly)
 *   bit 62  DESC_KEPT    the allowlist keeps it
 *   low 32  dense: elem (the block is n_candidates * elem bytes); ragged with a power-of-
 *           two elem: elem - 1 (the value bytes must have none of these bits); other
 *           ragged: 0 (their value bytes are checked by division, from slow_at: uint32
 *           indices of the n_slow such columns).
 *
 * For a ragged column the descriptor is also the mask its size difference (nb - head)
 * must clear: the sign bit catches nb < head, the low bits a partial value. */
#define DESC_RAGGED (1ULL << 63)
#define DESC_KEPT (1ULL << 62)
#define DESC_ELEM 0xFFFFFFFFULL

/* Where column i's descriptor is: each whole group of four columns is stored in the lane
 * order (0, 2, 1, 3) of the AVX2 table check; a last partial group in column order. */
static inline uint64_t
desc_at(uint64_t i, uint64_t n_columns)
{
    const uint64_t group = i & ~(uint64_t)3;
    return group + 4 <= n_columns ? group | ((0x3120u >> (4 * (i & 3))) & 3) : i;
}

/* The preamble checks of format.read_preamble that do not depend on the layout. */
static int
preamble_ok(const char *s, Py_ssize_t n)
{
    static const char zeros[FRAME_RESERVED1_SIZE];
    return n >= FRAME_PREAMBLE_SIZE
           && memcmp(s + FRAME_MAGIC_AT, FRAME_MAGIC, FRAME_MAGIC_SIZE) == 0
           && load_le(s + FRAME_VERSION_AT, FRAME_VERSION_SIZE) == FRAME_VERSION
           && load_le(s + FRAME_FLAGS_AT, FRAME_FLAGS_SIZE) == 0
           && load_le(s + FRAME_RESERVED0_AT, FRAME_RESERVED0_SIZE) == 0
           && memcmp(s + FRAME_RESERVED1_AT, zeros, FRAME_RESERVED1_SIZE) == 0
           && load_le(s + FRAME_FRAME_LEN_AT, FRAME_FRAME_LEN_SIZE) == (uint64_t)n;
}

/* One request, as read and validated by read_request.  table is the block table the
 * request was validated against: the memo's when it matched, else a private copy taken
 * before the checks (table_own, freed by request_release) -- so nothing that rewrites the
 * input meanwhile (another thread, a finalizer run by an allocation) can change a checked
 * offset or size; the copies then read the input only inside the checked blocks. */
typedef struct {
    PyObject *entry; /* the cache entry (a new reference), kept alive for the call */
    char *table_own; /* PyMem_Malloc'd copy of the input's block table, or NULL */
    PyObject *memo_obj; /* the memo this request uses (a new reference), or NULL */
    const char *blob, *s, *table;
    const char *memo; /* its bytes, when it holds this request's table, header and runs */
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
 * any block is bad.
 *
 * The checks are reformulated so that each column costs a few branch-free operations
 * (kept and ragged columns come in random patterns; a mispredicted branch per column would
 * cost more than the arithmetic), and the AVX2 version checks four columns per step with
 * no dependency between steps:
 *
 *   - every offset and size is below 2^62 (one OR accumulated over the table, tested at
 *     the end; a valid block lies inside the buffer, so this rejects nothing valid), so
 *     off + nb never wraps and signed vector compares are exact;
 *   - the chain data_start <= off[0] <= end[0] <= off[1] <= ... <= end[n-1] <= data_end
 *     (end = off + nb): blocks in order, not overlapping, each inside the data, which is
 *     what the per-block bounds checks of check_table amount to;
 *   - (nb - base) & mask == 0 with base = n_candidates * elem, mask = ~0 for a dense
 *     column (exact size) and base = head, mask = its descriptor for a ragged one (see
 *     DESC_RAGGED: nb >= head and a whole number of values). */
typedef struct {
    const char *t;
    const uint64_t *vec; /* DESC_* words, one per column */
    uint64_t n, n_cand, head, data_start, data_end;
} table_check;

/* What the column checks accumulate: OR of every offset (alignment, range) and size
 * (range), OR of the size mismatches and order violations, the previous block's end, the
 * padded sizes of the kept blocks. */
typedef struct {
    uint64_t offs, sizes, bad, prev, sum;
} check_acc;

#define CHECK_RANGE_BITS 0xC000000000000000ULL /* offsets and sizes are below 2^62 */

static inline void
check_one(const table_check *c, uint64_t i, check_acc *a)
{
    const uint64_t off = TABLE_OFF(c->t, i), nb = TABLE_NB(c->t, i);
    const uint64_t desc = c->vec[desc_at(i, c->n)];
    const uint64_t rag = (uint64_t)0 - (desc >> 63);
    const uint64_t base = (c->head & rag) | ((c->n_cand * (desc & DESC_ELEM)) & ~rag);
    a->offs |= off;
    a->sizes |= nb;
    a->bad |= ((nb - base) & ((desc & rag) | ~rag)) | (uint64_t)(off < a->prev);
    a->prev = off + nb;
    a->sum += align_up(nb, FRAME_BLOCK_ALIGN) & ((uint64_t)0 - ((desc >> 62) & 1));
}

static void
check_range(const table_check *c, uint64_t i, check_acc *a)
{
    for (; i < c->n; i++) {
        check_one(c, i, a);
    }
}

#ifdef HAVE_X86_KERNELS
/* Columns [0, i) four at a time while column i + 4 exists (its offset closes the order
 * check of column i + 3); returns i, the first column left to check_range.  a->prev is
 * then the end of column i - 1.  The lanes hold columns (0, 2, 1, 3) of each group -- the
 * order the in-lane unpacks of the table produce, and the order make_plan stores the
 * descriptors of each whole group in (see desc_at) -- so no cross-lane shuffle is needed. */
__attribute__((target("avx2"))) static uint64_t
check_range_avx2(const table_check *c, check_acc *a)
{
    const __m256i zero = _mm256_setzero_si256(), ones = _mm256_set1_epi64x(-1);
    const __m256i low = _mm256_set1_epi64x(FRAME_BLOCK_ALIGN - 1);
    const __m256d head = _mm256_castsi256_pd(_mm256_set1_epi64x((long long)c->head));
    const __m256i cand = _mm256_set1_epi64x((long long)c->n_cand);
    __m256i acc = zero, bad = zero, sum = zero;
    const char *t = c->t;
    const uint64_t *vec = c->vec, n = c->n;
    uint64_t i = 0;
    for (; i + 4 < n; i += 4) {
        const char *e = t + FRAME_TABLE_ENTRY_SIZE * i;
        __m256i e01 = _mm256_loadu_si256((const __m256i *)e);        /* off0 nb0 off1 nb1 */
        __m256i e23 = _mm256_loadu_si256((const __m256i *)(e + 32)); /* off2 nb2 off3 nb3 */
        __m256i s01 = _mm256_loadu_si256((const __m256i *)(e + 8));  /* nb0 off1 nb1 off2 */
        __m256i s23 = _mm256_loadu_si256((const __m256i *)(e + 40)); /* nb2 off3 nb3 off4 */
        acc = _mm256_or_si256(acc, _mm256_or_si256(e01, e23));
        __m256i off = _mm256_unpacklo_epi64(e01, e23);  /* off0 off2 off1 off3 */
        __m256i nb = _mm256_unpackhi_epi64(e01, e23);   /* nb0 nb2 nb1 nb3 */
        __m256i next = _mm256_unpackhi_epi64(s01, s23); /* off1 off3 off2 off4 */
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi64(_mm256_add_epi64(off, nb), next));
        __m256i desc = _mm256_loadu_si256((const __m256i *)(vec + i));
        __m256d d = _mm256_castsi256_pd(desc);
        __m256i base = _mm256_castpd_si256(
            _mm256_blendv_pd(_mm256_castsi256_pd(_mm256_mul_epu32(cand, desc)), head, d));
        __m256i mask = _mm256_castpd_si256(_mm256_blendv_pd(_mm256_castsi256_pd(ones), d, d));
        bad = _mm256_or_si256(bad, _mm256_and_si256(_mm256_sub_epi64(nb, base), mask));
        __m256i padded = _mm256_andnot_si256(low, _mm256_add_epi64(nb, low));
        __m256i kept = _mm256_cmpgt_epi64(zero, _mm256_slli_epi64(desc, 1));
        sum = _mm256_add_epi64(sum, _mm256_and_si256(padded, kept));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, sum);
    a->sum += lanes[0] + lanes[1] + lanes[2] + lanes[3];
    _mm256_storeu_si256((__m256i *)lanes, acc); /* [off, nb, off, nb] */
    a->offs |= lanes[0] | lanes[2];
    a->sizes |= lanes[1] | lanes[3];
    a->bad |= (uint64_t)!_mm256_testz_si256(bad, bad);
    if (i) {
        a->bad |= (uint64_t)(TABLE_OFF(t, 0) < a->prev); /* the first block vs data_start */
        a->prev = TABLE_OFF(t, i - 1) + TABLE_NB(t, i - 1);
    }
    return i;
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
    check_acc a = {0, 0, 0, data_start, 0};
    uint64_t i = 0;
#ifdef HAVE_X86_KERNELS
    if (kernel >= KERNEL_AVX2) {
        i = check_range_avx2(&c, &a);
    }
#endif
    check_range(&c, i, &a);
    uint64_t bad = a.bad | (a.offs & (FRAME_BLOCK_ALIGN - 1))
                   | ((a.offs | a.sizes) & CHECK_RANGE_BITS) | (uint64_t)(a.prev > data_end);
    const uint32_t *slow = (const uint32_t *)(blob + h->slow_at);
    const col_desc *cols = (const col_desc *)(blob + h->cols_at);
    for (uint64_t k = 0; k < h->n_slow; k++) { /* nb >= head is checked above */
        const uint64_t nb = TABLE_NB(t, slow[k]);
        bad |= nb >= c.head ? (nb - c.head) % cols[slow[k]].elem : 0;
    }
    if (bad) {
        return 0;
    }
    uint64_t last = 0;
    if (h->n_kept) {
        last = TABLE_NB(t, ((const uint32_t *)(blob + h->kept_at))[h->n_kept - 1]);
    }
    return h->header_len + a.sum - align_up(last, FRAME_BLOCK_ALIGN) + last;
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

/* A plan's memo (a bytes object of memo_bytes(head) bytes that only this module sees): the
 * last block table that passed check_blocks for the plan, with its n_candidates,
 * meta_offset, output metadata offset, output header and coalesced runs -- kept only for
 * plans without ragged columns, whose tables repeat from request to request (dense frames
 * with a repeated candidate count: every request).  A request whose table is byte for byte
 * the memo's skips the per-column checks, the output table and the run computation for one
 * compare, which exits at the first differing chunk.  A memo is never changed once built:
 * a new table gets a new memo, and a request holds a reference to the one it uses, so no
 * other request (another thread, or one a finalizer runs) can change it under its feet.
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



/* ---- Plan: one (layout, allowlist) plan, opaque to Python -------------------------------
 *
 * make_plan checks its arguments once and builds the blob in memory only this module can
 * reach (the memo too, later): no attribute, no buffer export, no constructor besides make_plan (the
 * type disallows instantiation, and copy/pickle find no state).  A plan cache entry that
 * is not a Plan is refused, so no Python code can hand plan_trim a blob whose offsets
 * point anywhere. */
typedef struct {
    PyObject_HEAD
    PyObject *layout; /* bytes: the layout section the plan was built for, layout_len long */
    char *blob;       /* plan_head, descriptors, kept, prefix: immutable after make_plan */
    PyObject *memo;   /* bytes: the current memo (see memo_head), or NULL */
} Plan;

static void
plan_dealloc(Plan *self)
{
    Py_XDECREF(self->layout);
    PyMem_Free(self->blob);
    Py_XDECREF(self->memo);
    PyObject_Free(self);
}

static PyObject *
plan_repr(Plan *self)
{
    const plan_head *h = (const plan_head *)self->blob;
    return PyUnicode_FromFormat("<Plan: %llu columns, %llu kept>",
                                (unsigned long long)h->n_columns, (unsigned long long)h->n_kept);
}

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "root_worker.frame._copyruns.Plan",
    .tp_basicsize = sizeof(Plan),
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_repr = (reprfunc)plan_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .tp_doc = "A checked trim plan of one (layout, allowlist), made by make_plan; opaque.",
};

/* make_plan(layout, n_columns, elem, ragged, kept, prefix, n_missing) -> Plan.  Every input
 * value is read once, into private memory, and checked there. */
static PyObject *
make_plan(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *layout;
    unsigned long long n_columns, n_missing;
    Py_buffer elem, ragged, kept, prefix;
    col_desc *cols = NULL;
    Plan *plan = NULL;

    if (!PyArg_ParseTuple(args, "SKy*y*y*y*K:make_plan", &layout, &n_columns, &elem, &ragged,
                          &kept, &prefix, &n_missing)) {
        return NULL;
    }
    const uint64_t layout_len = (uint64_t)PyBytes_GET_SIZE(layout);
    const uint64_t n_kept = (uint64_t)kept.len / sizeof(int64_t);
    if (!PyBytes_CheckExact(layout) || n_columns > UINT32_MAX || layout_len > UINT32_MAX
        || (uint64_t)elem.len != 8 * n_columns || (uint64_t)ragged.len != n_columns
        || kept.len % 8 != 0 || n_kept > n_columns || prefix.len < FRAME_PREAMBLE_SIZE
        || prefix.len % FRAME_TABLE_ALIGN != 0 || prefix.len > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "make_plan: inconsistent sizes");
        goto done;
    }
    cols = PyMem_Calloc((size_t)n_columns + 1, sizeof(col_desc));
    if (cols == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t n_ragged = 0, n_slow = 0;
    for (uint64_t i = 0; i < n_columns; i++) {
        uint64_t el;
        memcpy(&el, (const char *)elem.buf + 8 * i, 8); /* (any alignment) */
        const uint8_t rg = ((const uint8_t *)ragged.buf)[i];
        if (el == 0 || el > FRAME_MAX_ELEM_BYTES || rg > 1) {
            PyErr_Format(PyExc_ValueError, "make_plan: column %llu has element size %llu, "
                         "ragged flag %u", (unsigned long long)i, (unsigned long long)el,
                         (unsigned)rg);
            goto done;
        }
        cols[i].elem = (uint32_t)el;
        cols[i].ragged = rg;
        cols[i].slow = rg && (el & (el - 1)) != 0;
        n_ragged += rg;
        n_slow += cols[i].slow;
    }
    plan_head h;
    memset(&h, 0, sizeof h);
    h.magic = PLAN_MAGIC;
    h.n_columns = n_columns;
    h.layout_len = layout_len;
    h.table_offset = align_up(FRAME_PREAMBLE_SIZE + layout_len, FRAME_TABLE_ALIGN);
    h.n_kept = n_kept;
    h.n_missing = n_missing;
    h.n_ragged = n_ragged;
    h.n_slow = n_slow;
    h.out_table_offset = (uint64_t)prefix.len;
    uint64_t out_table_end = h.out_table_offset + FRAME_TABLE_ENTRY_SIZE * n_kept;
    h.header_len = n_kept ? align_up(out_table_end, FRAME_BLOCK_ALIGN) : out_table_end;
    h.cols_at = sizeof h;
    h.kept_at = h.cols_at + sizeof(col_desc) * n_columns;
    h.prefix_at = align_up(h.kept_at + 4 * n_kept, 8);
    h.vec_at = align_up(h.prefix_at + (uint64_t)prefix.len, 8);
    h.slow_at = h.vec_at + 8 * n_columns;
    h.blob_len = h.slow_at + 4 * h.n_slow;
    plan = PyObject_New(Plan, &PlanType);
    if (plan == NULL) {
        goto done;
    }
    plan->layout = Py_NewRef(layout);
    plan->memo = NULL;
    plan->blob = PyMem_Calloc(1, (size_t)h.blob_len);
    if (plan->blob == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    char *b = plan->blob;
    uint32_t *k32 = (uint32_t *)(b + h.kept_at);
    for (uint64_t j = 0; j < n_kept; j++) {
        int64_t k;
        memcpy(&k, (const char *)kept.buf + 8 * j, 8);
        if (k < 0 || (uint64_t)k >= n_columns || (j && (uint64_t)k <= k32[j - 1])) {
            PyErr_Format(PyExc_ValueError, "make_plan: kept[%llu] = %lld is not an "
                         "increasing column index", (unsigned long long)j, (long long)k);
            goto fail;
        }
        k32[j] = (uint32_t)k;
        cols[k].kept = 1;
    }
    memcpy(b, &h, sizeof h);
    memcpy(b + h.cols_at, cols, sizeof(col_desc) * n_columns);
    uint64_t *vec = (uint64_t *)(b + h.vec_at);
    uint32_t *slow = (uint32_t *)(b + h.slow_at);
    for (uint64_t i = 0, k = 0; i < n_columns; i++) {
        const uint64_t el = cols[i].elem;
        vec[desc_at(i, n_columns)] = (!cols[i].ragged ? el
                                      : DESC_RAGGED | (cols[i].slow ? 0 : el - 1))
                                     | (cols[i].kept ? DESC_KEPT : 0);
        if (cols[i].slow) {
            slow[k++] = (uint32_t)i;
        }
    }
    memcpy(b + h.prefix_at, prefix.buf, (size_t)prefix.len);
    goto done;
fail:
    Py_CLEAR(plan);
done:
    PyMem_Free(cols);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&kept);
    PyBuffer_Release(&ragged);
    PyBuffer_Release(&elem);
    return (PyObject *)plan;
}
