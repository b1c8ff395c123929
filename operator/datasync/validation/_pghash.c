/*
 * PostgreSQL's own hash functions, computed over DuckDB's Arrow data.
 *
 * Why: hashing each row in PostgreSQL through a text rendering costs several times more CPU
 * than the scan itself (jsonb and timestamptz output are slow).  PostgreSQL hashes values in
 * their binary form cheaply: hash_record_extended(ROW(...), 0) combines each column's own
 * extended hash function (lookup3 over the bytes, int hashing, numeric digit hashing, ...).
 * If the copy's rows are hashed with exactly the same functions, the row hashes of the two
 * sides are equal exactly when the values are, and PostgreSQL does the cheapest possible work.
 *
 * These are clean-room implementations of the algorithms (Bob Jenkins' public-domain lookup3
 * as PostgreSQL applies it, and PostgreSQL's documented hashing of ints, floats, numerics and
 * records); the test suite checks every kind against a live server, value by value.
 *
 * Input: Arrow arrays as raw buffer addresses (pyarrow's Buffer.address), so no copy is made.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------ lookup3 as PostgreSQL uses it */
#define ROT(x, k) (((x) << (k)) | ((x) >> (32 - (k))))
#define MIX(a, b, c)                                                                                   \
    {                                                                                                  \
        a -= c; a ^= ROT(c, 4); c += b;                                                                \
        b -= a; b ^= ROT(a, 6); a += c;                                                                \
        c -= b; c ^= ROT(b, 8); b += a;                                                                \
        a -= c; a ^= ROT(c, 16); c += b;                                                               \
        b -= a; b ^= ROT(a, 19); a += c;                                                               \
        c -= b; c ^= ROT(b, 4); b += a;                                                                \
    }
#define FINAL(a, b, c)                                                                                 \
    {                                                                                                  \
        c ^= b; c -= ROT(b, 14);                                                                       \
        a ^= c; a -= ROT(c, 11);                                                                       \
        b ^= a; b -= ROT(a, 25);                                                                       \
        c ^= b; c -= ROT(b, 16);                                                                       \
        a ^= c; a -= ROT(c, 4);                                                                        \
        b ^= a; b -= ROT(a, 14);                                                                       \
        c ^= b; c -= ROT(b, 24);                                                                       \
    }

static inline uint32_t le32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v; /* little-endian hosts only (checked at import) */
}

static uint64_t hash_bytes(const unsigned char *k, size_t keylen) {
    uint32_t a, b, c, len = (uint32_t)keylen;
    a = b = c = 0x9e3779b9u + len + 3923095u;
    while (len >= 12) {
        a += le32(k);
        b += le32(k + 4);
        c += le32(k + 8);
        MIX(a, b, c);
        k += 12;
        len -= 12;
    }
    switch (len) {
    case 11: c += ((uint32_t)k[10] << 24); /* fall through */
    case 10: c += ((uint32_t)k[9] << 16); /* fall through */
    case 9: c += ((uint32_t)k[8] << 8); /* fall through */
    case 8: b += ((uint32_t)k[7] << 24); /* fall through */
    case 7: b += ((uint32_t)k[6] << 16); /* fall through */
    case 6: b += ((uint32_t)k[5] << 8); /* fall through */
    case 5: b += k[4]; /* fall through */
    case 4: a += ((uint32_t)k[3] << 24); /* fall through */
    case 3: a += ((uint32_t)k[2] << 16); /* fall through */
    case 2: a += ((uint32_t)k[1] << 8); /* fall through */
    case 1: a += k[0];
    }
    FINAL(a, b, c);
    return ((uint64_t)b << 32) | c;
}

static inline uint64_t hash_u32(uint32_t k) {
    uint32_t a, b, c;
    a = b = c = 0x9e3779b9u + 4u + 3923095u;
    a += k;
    FINAL(a, b, c);
    return ((uint64_t)b << 32) | c;
}

static inline uint64_t hash_i64(int64_t v) {
    uint32_t lo = (uint32_t)v, hi = (uint32_t)((uint64_t)v >> 32);
    lo ^= (v >= 0) ? hi : ~hi;
    return hash_u32(lo);
}

static inline uint64_t hash_f64(double v) {
    if (v == 0.0) return 0;
    if (isnan(v)) v = NAN;
    unsigned char bytes[8];
    memcpy(bytes, &v, 8);
    return hash_bytes(bytes, 8);
}

/* numeric: base-10000 digits without leading/trailing zero groups, xor the weight */
static uint64_t hash_numeric_groups(const int16_t *groups, int n, int weight) {
    if (n == 0) return (uint64_t)-1; /* zero: seed - 1 */
    return hash_bytes((const unsigned char *)groups, (size_t)n * 2) ^ (uint64_t)(int64_t)weight;
}

/* digits: the decimal digits of |value| (no sign, no point), the last `scale` of them after the point */
static uint64_t hash_numeric_digits(const char *digits, int ndigits, int scale) {
    /* strip leading zeros */
    while (ndigits > 0 && digits[0] == '0' && ndigits > scale) {
        digits++;
        ndigits--;
    }
    int intlen = ndigits - scale; /* may be <= 0 */
    /* position of each digit relative to the point: digit i has exponent (intlen - 1 - i) */
    /* group g covers exponents [4g, 4g+3]; the top group index */
    int16_t groups[64];
    int ng = 0;
    int first_exp = intlen - 1, last_exp = intlen - ndigits; /* exponents of first and last digit */
    if (ndigits <= 0) return (uint64_t)-1;
    int gtop = first_exp >= 0 ? first_exp / 4 : -((-first_exp + 3) / 4);
    int gbot = last_exp >= 0 ? last_exp / 4 : -((-last_exp + 3) / 4);
    if (gtop - gbot + 1 > 64) return 0; /* beyond any DuckDB decimal: cannot happen */
    for (int g = gtop; g >= gbot; g--) {
        int val = 0;
        for (int e = 4 * g + 3; e >= 4 * g; e--) {
            int i = intlen - 1 - e;
            int d = (i >= 0 && i < ndigits) ? digits[i] - '0' : 0;
            val = val * 10 + d;
        }
        groups[ng++] = (int16_t)val;
    }
    int start = 0, end = ng;
    int weight = gtop;
    while (start < end && groups[start] == 0) {
        start++;
        weight--;
    }
    while (end > start && groups[end - 1] == 0) end--;
    return hash_numeric_groups(groups + start, end - start, weight);
}

static uint64_t hash_decimal128(const unsigned char *p, int scale) {
    __int128 v;
    memcpy(&v, p, 16);
    unsigned __int128 u = v < 0 ? (unsigned __int128)(-v) : (unsigned __int128)v;
    if (u == 0) return (uint64_t)-1;
    char buf[48];
    int n = 0;
    char rev[48];
    if (u <= UINT64_MAX) {
        uint64_t w = (uint64_t)u;
        while (w) { rev[n++] = (char)('0' + w % 10); w /= 10; }
    } else {
        while (u) { rev[n++] = (char)('0' + (int)(u % 10)); u /= 10; }
    }
    for (int i = 0; i < n; i++) buf[i] = rev[n - 1 - i];
    if (n <= scale) { /* left-pad so there is at least the fraction */
        memmove(buf + (scale - n + 1), buf, (size_t)n);
        memset(buf, '0', (size_t)(scale - n + 1));
        n = scale + 1;
    }
    return hash_numeric_digits(buf, n, scale);
}

static uint64_t hash_numeric_text(const unsigned char *s, size_t len) {
    char buf[1100];
    int n = 0, scale = -1;
    size_t i = 0;
    if (len && (s[0] == '-' || s[0] == '+')) i++;
    if (i < len && (s[i] == 'N' || s[i] == 'I' || s[i] == 'i' || s[i] == 'n')) return 0; /* NaN, ±Infinity: seed */
    for (; i < len; i++) {
        if (s[i] == '.') { scale = 0; continue; }
        if (s[i] < '0' || s[i] > '9') break;
        if (n < (int)sizeof(buf)) buf[n++] = (char)s[i];
        if (scale >= 0) scale++;
    }
    if (scale < 0) scale = 0;
    int nz = 0;
    for (int j = 0; j < n; j++) nz |= buf[j] != '0';
    if (!nz) return (uint64_t)-1;
    return hash_numeric_digits(buf, n, scale);
}

static int hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    c |= 0x20;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static uint64_t hash_uuid_text(const unsigned char *s, size_t len) {
    unsigned char out[16];
    int n = 0, hi = -1;
    for (size_t i = 0; i < len && n < 16; i++) {
        int v = hexval(s[i]);
        if (v < 0) continue;
        if (hi < 0) hi = v;
        else { out[n++] = (unsigned char)(hi << 4 | v); hi = -1; }
    }
    return hash_bytes(out, 16);
}


/* ------------------------------------------------------------------ jsonb, from its canonical text
 * The copy holds jsonb as PostgreSQL printed it (jsonb_out): object keys in jsonb's storage
 * order, numbers without exponents.  Walking that text token by token visits the values in
 * the order PostgreSQL's jsonb iterator does, so jsonb_hash_extended can be replayed on it. */
#define JB_FOBJECT 0x20000000ULL
#define JB_FARRAY 0x40000000ULL

typedef struct {
    const unsigned char *p, *end;
    uint64_t h;
    int bad;
} JsonWalk;

static inline void jb_scalar(JsonWalk *w, uint64_t tmp) {
    uint64_t v = w->h;
    w->h = ((v << 1) & 0xfffffffefffffffeULL) | ((v >> 31) & 0x100000001ULL);
    w->h ^= tmp;
}

static inline void jb_ws(JsonWalk *w) {
    while (w->p < w->end && (*w->p == ' ' || *w->p == '\n' || *w->p == '\t' || *w->p == '\r')) w->p++;
}

static void put_utf8(unsigned char *out, size_t *n, uint32_t cp) {
    if (cp < 0x80) out[(*n)++] = (unsigned char)cp;
    else if (cp < 0x800) { out[(*n)++] = (unsigned char)(0xC0 | (cp >> 6)); out[(*n)++] = (unsigned char)(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) {
        out[(*n)++] = (unsigned char)(0xE0 | (cp >> 12));
        out[(*n)++] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*n)++] = (unsigned char)(0x80 | (cp & 0x3F));
    } else {
        out[(*n)++] = (unsigned char)(0xF0 | (cp >> 18));
        out[(*n)++] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        out[(*n)++] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*n)++] = (unsigned char)(0x80 | (cp & 0x3F));
    }
}

static uint32_t hex4(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        int d = hexval(p[i]);
        if (d < 0) return 0xFFFFFFFFu;
        v = v << 4 | (uint32_t)d;
    }
    return v;
}

/* the hash of the string at w->p (an opening quote), unescaped */
static uint64_t jb_string(JsonWalk *w) {
    const unsigned char *start = ++w->p;
    int escaped = 0;
    /* fast path: the closing quote, and no backslash before it */
    const unsigned char *quote = memchr(w->p, '"', (size_t)(w->end - w->p));
    if (quote != NULL && memchr(w->p, '\\', (size_t)(quote - w->p)) == NULL) {
        w->p = quote;
    } else {
        while (w->p < w->end && *w->p != '"') {
            if (*w->p == '\\') { escaped = 1; w->p++; }
            w->p++;
        }
    }
    if (w->p >= w->end) { w->bad = 1; return 0; }
    const unsigned char *stop = w->p++;
    if (!escaped) return hash_bytes(start, (size_t)(stop - start));
    unsigned char small[256];
    size_t cap = (size_t)(stop - start);
    unsigned char *buf = cap <= sizeof(small) ? small : PyMem_Malloc(cap);
    if (!buf) { w->bad = 1; return 0; }
    size_t n = 0;
    for (const unsigned char *q = start; q < stop; q++) {
        if (*q != '\\') { buf[n++] = *q; continue; }
        q++;
        switch (*q) {
        case 'b': buf[n++] = '\b'; break;
        case 'f': buf[n++] = '\f'; break;
        case 'n': buf[n++] = '\n'; break;
        case 'r': buf[n++] = '\r'; break;
        case 't': buf[n++] = '\t'; break;
        case 'u': {
            uint32_t cp = (q + 4 < stop + 1) ? hex4(q + 1) : 0xFFFFFFFFu;
            if (cp == 0xFFFFFFFFu) { w->bad = 1; break; }
            q += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && q + 6 < stop + 1 && q[1] == '\\' && q[2] == 'u') {
                uint32_t lo = hex4(q + 3);
                if (lo >= 0xDC00 && lo < 0xE000) { cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00); q += 6; }
            }
            put_utf8(buf, &n, cp);
            break;
        }
        default: buf[n++] = *q; /* \" \\ \/ */
        }
    }
    uint64_t h = hash_bytes(buf, n);
    if (buf != small) PyMem_Free(buf);
    return h;
}

static void jb_value(JsonWalk *w, int depth) {
    jb_ws(w);
    if (w->p >= w->end || depth > 10000) { w->bad = 1; return; }
    unsigned char c = *w->p;
    if (c == '{' || c == '[') {
        unsigned char close = c == '{' ? '}' : ']';
        w->h ^= c == '{' ? (JB_FOBJECT << 32 | JB_FOBJECT) : (JB_FARRAY << 32 | JB_FARRAY);
        w->p++;
        jb_ws(w);
        if (w->p < w->end && *w->p == close) { w->p++; return; }
        while (!w->bad) {
            if (c == '{') {
                jb_ws(w);
                if (w->p >= w->end || *w->p != '"') { w->bad = 1; return; }
                jb_scalar(w, jb_string(w));
                jb_ws(w);
                if (w->p >= w->end || *w->p != ':') { w->bad = 1; return; }
                w->p++;
            }
            jb_value(w, depth + 1);
            jb_ws(w);
            if (w->p < w->end && *w->p == ',') { w->p++; continue; }
            if (w->p < w->end && *w->p == close) { w->p++; return; }
            w->bad = 1;
        }
        return;
    }
    if (c == '"') { jb_scalar(w, jb_string(w)); return; }
    if (c == 't' && w->end - w->p >= 4) { w->p += 4; jb_scalar(w, 0x02); return; }
    if (c == 'f' && w->end - w->p >= 5) { w->p += 5; jb_scalar(w, 0x04); return; }
    if (c == 'n' && w->end - w->p >= 4) { w->p += 4; jb_scalar(w, 0x01); return; }
    const unsigned char *start = w->p;
    while (w->p < w->end && (*w->p == '-' || *w->p == '+' || *w->p == '.' || (*w->p >= '0' && *w->p <= '9'))) w->p++;
    if (w->p == start) { w->bad = 1; return; }
    jb_scalar(w, hash_numeric_text(start, (size_t)(w->p - start)));
}

static uint64_t hash_jsonb_text(const unsigned char *p, size_t len, int *bad) {
    JsonWalk w = {p, p + len, 0, 0};
    jb_ws(&w);
    if (w.p < w.end && (*w.p == '{' || *w.p == '[')) {
        /* an empty root container hashes to the seed */
        const unsigned char *q = w.p + 1;
        while (q < w.end && (*q == ' ' || *q == '\n' || *q == '\t' || *q == '\r')) q++;
        if (q < w.end && *q == (*w.p == '{' ? '}' : ']')) return 0;
    } else {
        w.h ^= JB_FARRAY << 32 | JB_FARRAY; /* a root scalar is a one-element array */
    }
    jb_value(&w, 0);
    if (w.bad) *bad = 1;
    return w.h;
}

/* ------------------------------------------------------------------ columns */
enum {
    K_I16 = 1, K_I32 = 2, K_I64 = 3, K_BOOL = 4, K_DATE = 5, K_TS = 6, K_F32 = 7, K_F64 = 8,
    K_DEC128 = 9, K_NUMTEXT = 10, K_TEXT = 11, K_BPCHAR = 12, K_UUIDTEXT = 13, K_TIME = 14, K_JSONB = 15,
};

#define PG_DATE_SHIFT 10957                  /* days from 1970-01-01 to 2000-01-01 */
#define PG_TS_SHIFT 946684800000000LL        /* microseconds between the same */

typedef struct {
    int kind;
    int64_t offset;           /* the array's offset into its buffers */
    const uint8_t *validity;  /* NULL: no nulls */
    const uint8_t *data;      /* values (fixed width) or string bytes */
    const uint8_t *offsets;   /* string offsets */
    int wide_offsets;         /* large_string: 64-bit offsets */
    int scale;                /* decimal scale */
} Column;

static inline int is_null(const Column *c, int64_t i) {
    if (!c->validity) return 0;
    int64_t j = i + c->offset;
    return !((c->validity[j >> 3] >> (j & 7)) & 1);
}

static inline void str_at(const Column *c, int64_t i, const unsigned char **p, size_t *len) {
    int64_t j = i + c->offset, a, b;
    if (c->wide_offsets) {
        memcpy(&a, c->offsets + 8 * j, 8);
        memcpy(&b, c->offsets + 8 * (j + 1), 8);
    } else {
        int32_t a32, b32;
        memcpy(&a32, c->offsets + 4 * j, 4);
        memcpy(&b32, c->offsets + 4 * (j + 1), 4);
        a = a32;
        b = b32;
    }
    *p = c->data + a;
    *len = (size_t)(b - a);
}

static uint64_t element_hash(const Column *c, int64_t i) {
    if (is_null(c, i)) return 0;
    int64_t j = i + c->offset;
    switch (c->kind) {
    case K_I16: { int16_t v; memcpy(&v, c->data + 2 * j, 2); return hash_u32((uint32_t)(int32_t)v); }
    case K_I32: { int32_t v; memcpy(&v, c->data + 4 * j, 4); return hash_u32((uint32_t)v); }
    case K_I64: { int64_t v; memcpy(&v, c->data + 8 * j, 8); return hash_i64(v); }
    case K_TIME: { int64_t v; memcpy(&v, c->data + 8 * j, 8); return hash_i64(v); }
    case K_BOOL: { int v = (c->data[j >> 3] >> (j & 7)) & 1; return hash_u32((uint32_t)v); }
    case K_DATE: {
        int32_t v;
        memcpy(&v, c->data + 4 * j, 4);
        if (v == INT32_MAX) return hash_u32((uint32_t)INT32_MAX);
        if (v == -INT32_MAX) return hash_u32((uint32_t)INT32_MIN);
        return hash_u32((uint32_t)(v - PG_DATE_SHIFT));
    }
    case K_TS: {
        int64_t v;
        memcpy(&v, c->data + 8 * j, 8);
        if (v == INT64_MAX) return hash_i64(INT64_MAX);
        if (v == -INT64_MAX) return hash_i64(INT64_MIN);
        return hash_i64(v - PG_TS_SHIFT);
    }
    case K_F32: { float v; memcpy(&v, c->data + 4 * j, 4); return hash_f64((double)v); }
    case K_F64: { double v; memcpy(&v, c->data + 8 * j, 8); return hash_f64(v); }
    case K_DEC128: return hash_decimal128(c->data + 16 * j, c->scale);
    default: {
        const unsigned char *p;
        size_t len;
        str_at(c, i, &p, &len);
        switch (c->kind) {
        case K_NUMTEXT: return hash_numeric_text(p, len);
        case K_UUIDTEXT: return hash_uuid_text(p, len);
        case K_BPCHAR: while (len > 0 && p[len - 1] == ' ') len--; return hash_bytes(p, len);
        case K_JSONB: { int bad = 0; uint64_t h = hash_jsonb_text(p, len, &bad); return bad ? 0x5bad5bad5bad5badULL : h; }
        default: return hash_bytes(p, len);
        }
    }
    }
}

static inline uint64_t record_hash(const Column *cols, const int *which, int n, int64_t i) {
    uint64_t result = 0;
    for (int k = 0; k < n; k++) result = (result << 5) - result + element_hash(&cols[which[k]], i);
    return result;
}

static int read_columns(PyObject *spec, Column **out, Py_ssize_t *n) {
    /* spec: sequence of (kind, offset, validity, data, offsets, wide_offsets, scale) */
    PyObject *seq = PySequence_Fast(spec, "columns must be a sequence");
    if (!seq) return -1;
    *n = PySequence_Fast_GET_SIZE(seq);
    *out = PyMem_Calloc((size_t)(*n ? *n : 1), sizeof(Column));
    if (!*out) { Py_DECREF(seq); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t k = 0; k < *n; k++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, k);
        long long kind, offset, validity, data, offsets, wide, scale;
        if (!PyArg_ParseTuple(t, "LLLLLLL", &kind, &offset, &validity, &data, &offsets, &wide, &scale)) {
            Py_DECREF(seq);
            PyMem_Free(*out);
            return -1;
        }
        Column *c = &(*out)[k];
        c->kind = (int)kind;
        c->offset = offset;
        c->validity = (const uint8_t *)(uintptr_t)validity;
        c->data = (const uint8_t *)(uintptr_t)data;
        c->offsets = (const uint8_t *)(uintptr_t)offsets;
        c->wide_offsets = (int)wide;
        c->scale = (int)scale;
    }
    Py_DECREF(seq);
    return 0;
}

static int read_ints(PyObject *obj, int **out, Py_ssize_t *n) {
    PyObject *seq = PySequence_Fast(obj, "expected a sequence of ints");
    if (!seq) return -1;
    *n = PySequence_Fast_GET_SIZE(seq);
    *out = PyMem_Calloc((size_t)(*n ? *n : 1), sizeof(int));
    for (Py_ssize_t k = 0; k < *n; k++) (*out)[k] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, k));
    Py_DECREF(seq);
    return PyErr_Occurred() ? -1 : 0;
}

static inline int64_t bucket_of(const Column *cols, int int_key, const int *keys, int nkeys, int64_t nb, int64_t i) {
    int64_t h;
    if (int_key) {
        const Column *c = &cols[keys[0]];
        int64_t j = i + c->offset;
        if (c->kind == K_I16) { int16_t v; memcpy(&v, c->data + 2 * j, 2); h = v; }
        else if (c->kind == K_I32) { int32_t v; memcpy(&v, c->data + 4 * j, 4); h = v; }
        else memcpy(&h, c->data + 8 * j, 8);
    } else {
        h = (int64_t)record_hash(cols, keys, nkeys, i);
    }
    return ((h % nb) + nb) % nb;
}

/* aggregate(columns, nrows, int_key, keys, nbuckets, nhashed, counts: bytearray, sums: bytearray)
 * the first nhashed columns make the row hash; keys index the key columns among them */
static PyObject *aggregate(PyObject *self, PyObject *args) {
    PyObject *spec, *keyspec;
    long long nrows, nb;
    int int_key, nhashed;
    Py_buffer counts, sums;
    if (!PyArg_ParseTuple(args, "OLpOLiw*w*", &spec, &nrows, &int_key, &keyspec, &nb, &nhashed, &counts, &sums))
        return NULL;
    Column *cols = NULL;
    int *keys = NULL;
    Py_ssize_t ncols, nkeys;
    PyObject *result = NULL;
    if (read_columns(spec, &cols, &ncols) < 0 || read_ints(keyspec, &keys, &nkeys) < 0) goto done;
    if (counts.len < nb * 8 || sums.len < nb * 8) { PyErr_SetString(PyExc_ValueError, "accumulators too small"); goto done; }
    if (nhashed > ncols || nb < 1) { PyErr_SetString(PyExc_ValueError, "bad column count or buckets"); goto done; }
    int *all = PyMem_Calloc((size_t)(ncols ? ncols : 1), sizeof(int));
    for (int k = 0; k < ncols; k++) all[k] = k;
    int64_t *cnt = (int64_t *)counts.buf;
    uint64_t *sum = (uint64_t *)sums.buf;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 0; i < nrows; i++) {
        int64_t b = bucket_of(cols, int_key, keys, (int)nkeys, nb, i);
        cnt[b] += 1;
        sum[b] += record_hash(cols, all, nhashed, i);
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(all);
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(cols);
    PyMem_Free(keys);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&sums);
    return result;
}

/* collect(columns, nrows, int_key, keys, nbuckets, nhashed, wanted: one byte per bucket) -> [(row, hash)] */
static PyObject *collect(PyObject *self, PyObject *args) {
    PyObject *spec, *keyspec;
    long long nrows, nb;
    int int_key, nhashed;
    Py_buffer wanted;
    if (!PyArg_ParseTuple(args, "OLpOLiy*", &spec, &nrows, &int_key, &keyspec, &nb, &nhashed, &wanted)) return NULL;
    Column *cols = NULL;
    int *keys = NULL;
    Py_ssize_t ncols, nkeys;
    PyObject *out = NULL;
    if (read_columns(spec, &cols, &ncols) < 0 || read_ints(keyspec, &keys, &nkeys) < 0) goto done;
    if (nhashed > ncols || nb < 1) { PyErr_SetString(PyExc_ValueError, "bad column count or buckets"); goto done; }
    out = PyList_New(0);
    int *all = PyMem_Calloc((size_t)(ncols ? ncols : 1), sizeof(int));
    for (int k = 0; k < ncols; k++) all[k] = k;
    const unsigned char *w = (const unsigned char *)wanted.buf;
    for (int64_t i = 0; i < nrows; i++) {
        int64_t b = bucket_of(cols, int_key, keys, (int)nkeys, nb, i);
        if (b < wanted.len && w[b]) {
            PyObject *t = Py_BuildValue("(LL)", (long long)i, (long long)record_hash(cols, all, nhashed, i));
            PyList_Append(out, t);
            Py_DECREF(t);
        }
    }
    PyMem_Free(all);
done:
    PyMem_Free(cols);
    PyMem_Free(keys);
    PyBuffer_Release(&wanted);
    return out;
}

/* element_hashes(column) -> [hash per row] (tests: compare with PostgreSQL value by value) */
static PyObject *element_hashes(PyObject *self, PyObject *args) {
    PyObject *spec;
    long long nrows;
    if (!PyArg_ParseTuple(args, "OL", &spec, &nrows)) return NULL;
    Column *cols = NULL;
    Py_ssize_t ncols;
    if (read_columns(spec, &cols, &ncols) < 0) return NULL;
    int *all = PyMem_Calloc((size_t)(ncols ? ncols : 1), sizeof(int));
    for (int k = 0; k < ncols; k++) all[k] = k;
    PyObject *out = PyList_New(nrows);
    for (int64_t i = 0; i < nrows; i++)
        PyList_SET_ITEM(out, i, PyLong_FromLongLong((long long)record_hash(cols, all, (int)ncols, i)));
    PyMem_Free(all);
    PyMem_Free(cols);
    return out;
}

static PyMethodDef methods[] = {
    {"aggregate", aggregate, METH_VARARGS, "Add each row's bucket count and record hash into the accumulators."},
    {"collect", collect, METH_VARARGS, "Row numbers and record hashes of the rows in the wanted buckets."},
    {"record_hashes", element_hashes, METH_VARARGS, "hash_record_extended(ROW(columns), 0) of every row."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pghash", "PostgreSQL's hash functions over Arrow data.",
                                    -1, methods};

PyMODINIT_FUNC PyInit__pghash(void) {
    uint16_t probe = 1;
    if (*(unsigned char *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "_pghash supports little-endian hosts only");
        return NULL;
    }
    return PyModule_Create(&module);
}
