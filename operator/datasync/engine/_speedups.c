/* C fast path for the pgoutput hot loop: Insert/Update/Delete messages.
 *
 * Why: decoding TupleData is the one per-value loop on the CDC path; in Python
 * it caps CDC at a few tens of thousands of changes per second on one core.
 * The pure-Python decoder in pgoutput.py stays the reference: tests run both
 * on the same bytes and require identical results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *UNCHANGED = NULL;
static PyObject *DECODE_ERROR = NULL;

static inline uint32_t rd32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static PyObject *fail(const char *msg) {
    PyErr_SetString(DECODE_ERROR ? DECODE_ERROR : PyExc_ValueError, msg);
    return NULL;
}

static PyObject *parse_tuple(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *pos, int *unchanged) {
    if (*pos + 2 > len) return fail("truncated tuple header");
    int16_t n = (int16_t)(((uint16_t)buf[*pos] << 8) | buf[*pos + 1]);
    *pos += 2;
    if (n < 0) return fail("negative column count");
    PyObject *list = PyList_New(n);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (*pos >= len) { Py_DECREF(list); return fail("truncated tuple"); }
        unsigned char kind = buf[(*pos)++];
        PyObject *v;
        if (kind == 't' || kind == 'b') {
            if (*pos + 4 > len) { Py_DECREF(list); return fail("truncated value length"); }
            int32_t l = (int32_t)rd32(buf + *pos);
            *pos += 4;
            if (l < 0 || *pos + l > len) { Py_DECREF(list); return fail("truncated value"); }
            if (kind == 't')
                v = PyUnicode_DecodeUTF8((const char *)buf + *pos, l, "strict");
            else
                v = PyBytes_FromStringAndSize((const char *)buf + *pos, l);
            if (!v) { Py_DECREF(list); return NULL; }
            *pos += l;
        } else if (kind == 'n') {
            v = Py_None; Py_INCREF(v);
        } else if (kind == 'u') {
            v = UNCHANGED; Py_INCREF(v);
            *unchanged = 1;
        } else {
            Py_DECREF(list);
            return fail("unknown tuple column kind");
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

/* decode_change(data) -> (tag, relid, new, old, old_is_key_only, new_has_unchanged) for 'I'/'U'/'D', else None */
static PyObject *decode_change(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    Py_ssize_t len = view.len, pos = 1;
    PyObject *result = NULL, *newt = NULL, *oldt = NULL;
    int key_only = 1, unchanged_new = 0, unchanged_old = 0;
    if (len < 6) {
        if (len >= 1 && (buf[0] == 'I' || buf[0] == 'U' || buf[0] == 'D')) fail("truncated change message");
        else { Py_INCREF(Py_None); result = Py_None; }
        goto done;
    }
    unsigned char tag = buf[0];
    if (tag != 'I' && tag != 'U' && tag != 'D') { Py_INCREF(Py_None); result = Py_None; goto done; }
    uint32_t relid = rd32(buf + pos);
    pos += 4;
    unsigned char marker = buf[pos++];
    if (tag == 'I') {
        if (marker != 'N') { fail("insert without new tuple"); goto done; }
        if (!(newt = parse_tuple(buf, len, &pos, &unchanged_new))) goto done;
    } else if (tag == 'U') {
        if (marker == 'K' || marker == 'O') {
            key_only = marker == 'K';
            if (!(oldt = parse_tuple(buf, len, &pos, &unchanged_old))) goto done;
            if (pos >= len) { fail("update without new tuple"); goto done; }
            marker = buf[pos++];
        }
        if (marker != 'N') { fail("update without new tuple"); goto done; }
        if (!(newt = parse_tuple(buf, len, &pos, &unchanged_new))) goto done;
    } else {
        if (marker != 'K' && marker != 'O') { fail("delete without old tuple"); goto done; }
        key_only = marker == 'K';
        if (!(oldt = parse_tuple(buf, len, &pos, &unchanged_old))) goto done;
    }
    result = Py_BuildValue("(ikOOOO)", (int)tag, (unsigned long)relid, newt ? newt : Py_None,
                           oldt ? oldt : Py_None, key_only ? Py_True : Py_False,
                           unchanged_new ? Py_True : Py_False);
done:
    Py_XDECREF(newt);
    Py_XDECREF(oldt);
    PyBuffer_Release(&view);
    return result;
}


/* ---------------------------------------------------------------------------
 * Binary COPY → Arrow buffers (the snapshot's fast path).
 *
 * decode_copy_binary(data, kinds, scales) -> (nrows, [(validity, data, offsets|None), ...])
 * kinds: one byte per column (see snapshotting.py); scales: decimal scale per column.
 * Raises NeedsText for values Arrow cannot hold (±infinity dates/timestamps): the caller
 * then reads that chunk through the text path.
 * ------------------------------------------------------------------------- */

static PyObject *NEEDS_TEXT = NULL;

typedef struct { char *p; Py_ssize_t len, cap; } Buf;

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *np = PyMem_Realloc(b->p, cap);
    if (!np) { PyErr_NoMemory(); return -1; }
    b->p = np; b->cap = cap;
    return 0;
}
static int buf_put(Buf *b, const void *src, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->p + b->len, src, n); b->len += n;
    return 0;
}
static int buf_zero(Buf *b, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memset(b->p + b->len, 0, n); b->len += n;
    return 0;
}

static inline uint64_t rd64(const unsigned char *p) {
    return ((uint64_t)rd32(p) << 32) | rd32(p + 4);
}
static inline uint16_t rd16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }

typedef struct { Buf valid, data, offsets; int64_t off; } Col;

static const int64_t PG_EPOCH_DAYS = 10957;
static const int64_t PG_EPOCH_US = 946684800000000LL;

static int set_valid(Col *c, Py_ssize_t row, int valid) {
    if ((row & 7) == 0 && buf_zero(&c->valid, 1) < 0) return -1;
    if (valid) c->valid.p[row >> 3] |= (char)(1 << (row & 7));
    return 0;
}

static int put_var(Col *c, const unsigned char *p, int32_t n) {
    if (n > 0 && buf_put(&c->data, p, n) < 0) return -1;
    c->off += n;
    return buf_put(&c->offsets, &c->off, 8);
}

static int numeric_to_i128(const unsigned char *p, int32_t len, int scale, __int128 *out, int *is_null) {
    if (len < 8) return -1;
    int16_t ndigits = (int16_t)rd16(p), weight = (int16_t)rd16(p + 2);
    uint16_t sign = rd16(p + 4);
    if (len < 8 + 2 * ndigits) return -1;
    if (sign == 0xC000 || sign == 0xD000 || sign == 0xF000) { *is_null = 1; *out = 0; return 0; }
    __int128 acc = 0;
    for (int i = 0; i < ndigits; i++) {
        int64_t d = rd16(p + 8 + 2 * i);
        int e = 4 * (weight - i) + scale;
        if (e >= 0) {
            __int128 m = d;
            for (int k = 0; k < e; k++) m *= 10;
            acc += m;
        } else {
            int64_t div = 1;
            for (int k = 0; k < -e && k < 4; k++) div *= 10;
            if (-e < 4) acc += d / div;
        }
    }
    *out = sign == 0x4000 ? -acc : acc;
    *is_null = 0;
    return 0;
}

static void free_cols(Col *cols, int n) {
    for (int i = 0; i < n; i++) {
        PyMem_Free(cols[i].valid.p); PyMem_Free(cols[i].data.p); PyMem_Free(cols[i].offsets.p);
    }
    PyMem_Free(cols);
}

static PyObject *decode_copy_binary(PyObject *self, PyObject *args) {
    Py_buffer view, kview;
    PyObject *scales_obj;
    if (!PyArg_ParseTuple(args, "y*y*O", &view, &kview, &scales_obj)) return NULL;
    const unsigned char *buf = view.buf, *kinds = kview.buf;
    Py_ssize_t len = view.len, pos = 0, rows = 0;
    int ncols = (int)kview.len;
    int *scales = NULL;
    Col *cols = PyMem_Calloc(ncols ? ncols : 1, sizeof(Col));
    PyObject *result = NULL;
    if (!cols) { PyErr_NoMemory(); goto out; }
    scales = PyMem_Calloc(ncols ? ncols : 1, sizeof(int));
    if (!scales) { PyErr_NoMemory(); goto out; }
    for (int i = 0; i < ncols; i++) {
        PyObject *it = PySequence_GetItem(scales_obj, i);
        if (!it) goto out;
        scales[i] = (int)PyLong_AsLong(it);
        Py_DECREF(it);
        int64_t zero = 0;
        char k = kinds[i];
        if ((k == 's' || k == 'j' || k == 'x' || k == 'y' || k == 'u') && buf_put(&cols[i].offsets, &zero, 8) < 0) goto out;
    }
    if (len == 0) goto build;
    if (len < 19 || memcmp(buf, "PGCOPY\n\377\r\n\0", 11) != 0) { fail("not a binary COPY stream"); goto out; }
    pos = 15;
    uint32_t ext = rd32(buf + pos); pos += 4 + ext;
    while (1) {
        if (pos + 2 > len) { fail("truncated COPY stream"); goto out; }
        int16_t nf = (int16_t)rd16(buf + pos); pos += 2;
        if (nf == -1) break;
        if (nf != ncols) { fail("COPY row has an unexpected number of fields"); goto out; }
        for (int i = 0; i < ncols; i++) {
            if (pos + 4 > len) { fail("truncated COPY field"); goto out; }
            int32_t n = (int32_t)rd32(buf + pos); pos += 4;
            if (n > 0 && pos + n > len) { fail("truncated COPY value"); goto out; }
            const unsigned char *p = buf + pos;
            Col *c = &cols[i];
            char k = kinds[i];
            int valid = n >= 0;
            if (set_valid(c, rows, valid) < 0) goto out;
            switch (k) {
            case 'h': { int16_t v = valid ? (int16_t)rd16(p) : 0; if (buf_put(&c->data, &v, 2) < 0) goto out; break; }
            case 'i': case 'f': { uint32_t v = valid ? rd32(p) : 0; if (buf_put(&c->data, &v, 4) < 0) goto out; break; }
            case 'l': case 'd': case 'm': { uint64_t v = valid ? rd64(p) : 0; if (buf_put(&c->data, &v, 8) < 0) goto out; break; }
            case 'b': { uint8_t v = valid ? p[0] : 0; if (buf_put(&c->data, &v, 1) < 0) goto out; break; }
            case 'D': {
                int32_t v = valid ? (int32_t)rd32(p) : 0;
                if (valid && (v == INT32_MAX || v == INT32_MIN)) { PyErr_SetString(NEEDS_TEXT, "infinite date"); goto out; }
                v += valid ? (int32_t)PG_EPOCH_DAYS : 0;
                if (buf_put(&c->data, &v, 4) < 0) goto out;
                break;
            }
            case 't': case 'T': {
                int64_t v = valid ? (int64_t)rd64(p) : 0;
                if (valid && (v == INT64_MAX || v == INT64_MIN)) { PyErr_SetString(NEEDS_TEXT, "infinite timestamp"); goto out; }
                /* DuckDB counts from 1970 and ends 30 years before PostgreSQL: never wrap, let the
                   text path report the value DuckDB cannot hold */
                if (valid && v > INT64_MAX - 1 - PG_EPOCH_US) { PyErr_SetString(NEEDS_TEXT, "timestamp beyond DuckDB"); goto out; }
                v += valid ? PG_EPOCH_US : 0;
                if (buf_put(&c->data, &v, 8) < 0) goto out;
                break;
            }
            case 'v': {
                /* PostgreSQL: int64 µs, int32 days, int32 months; Arrow: int32 months, int32 days, int64 ns */
                int32_t mo = 0, dy = 0; int64_t ns = 0;
                if (valid) {
                    if (n != 16) { fail("bad interval"); goto out; }
                    int64_t us = (int64_t)rd64(p);
                    if (us > INT64_MAX / 1000 || us < INT64_MIN / 1000) { PyErr_SetString(NEEDS_TEXT, "interval"); goto out; }
                    ns = us * 1000; dy = (int32_t)rd32(p + 8); mo = (int32_t)rd32(p + 12);
                }
                if (buf_put(&c->data, &mo, 4) < 0 || buf_put(&c->data, &dy, 4) < 0 || buf_put(&c->data, &ns, 8) < 0) goto out;
                break;
            }
            case 'n': {
                __int128 v = 0; int is_null = 0;
                if (valid) {
                    if (numeric_to_i128(p, n, scales[i], &v, &is_null) < 0) { fail("bad numeric"); goto out; }
                    if (is_null) c->valid.p[rows >> 3] &= (char)~(1 << (rows & 7));
                }
                if (buf_put(&c->data, &v, 16) < 0) goto out;
                break;
            }
            case 'u': {
                if (valid) {
                    if (n != 16) { fail("bad uuid"); goto out; }
                    static const char hex[] = "0123456789abcdef";
                    unsigned char s[36]; int o = 0;
                    for (int b = 0; b < 16; b++) {
                        if (b == 4 || b == 6 || b == 8 || b == 10) s[o++] = '-';
                        s[o++] = hex[p[b] >> 4]; s[o++] = hex[p[b] & 15];
                    }
                    if (put_var(c, s, 36) < 0) goto out;
                } else if (put_var(c, NULL, 0) < 0) goto out;
                break;
            }
            case 'j':  /* jsonb: a version byte, then the text */
                if (valid) {
                    if (n < 1 || p[0] != 1) { fail("unknown jsonb version"); goto out; }
                    if (put_var(c, p + 1, n - 1) < 0) goto out;
                } else if (put_var(c, NULL, 0) < 0) goto out;
                break;
            case 's': case 'x': case 'y':
                if (put_var(c, p, valid ? n : 0) < 0) goto out;
                break;
            default:
                fail("unknown column kind"); goto out;
            }
            if (n > 0) pos += n;
        }
        rows++;
    }
build:
    result = PyTuple_New(2);
    if (!result) goto out;
    PyTuple_SET_ITEM(result, 0, PyLong_FromSsize_t(rows));
    PyObject *list = PyList_New(ncols);
    if (!list) { Py_CLEAR(result); goto out; }
    PyTuple_SET_ITEM(result, 1, list);
    for (int i = 0; i < ncols; i++) {
        Col *c = &cols[i];
        char k = kinds[i];
        int var = k == 's' || k == 'j' || k == 'x' || k == 'y' || k == 'u';
        PyObject *t = Py_BuildValue("(y#y#)", c->valid.p ? c->valid.p : "", c->valid.len,
                                    c->data.p ? c->data.p : "", c->data.len);
        if (!t) { Py_CLEAR(result); goto out; }
        PyObject *offs = var ? PyBytes_FromStringAndSize(c->offsets.p, c->offsets.len) : (Py_INCREF(Py_None), Py_None);
        if (!offs) { Py_DECREF(t); Py_CLEAR(result); goto out; }
        PyObject *triple = PyTuple_Pack(3, PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1), offs);
        Py_DECREF(t); Py_DECREF(offs);
        if (!triple) { Py_CLEAR(result); goto out; }
        PyList_SET_ITEM(list, i, triple);
    }
out:
    if (cols) free_cols(cols, ncols);
    PyMem_Free(scales);
    PyBuffer_Release(&view);
    PyBuffer_Release(&kview);
    return result;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *unchanged, *error, *needs_text = NULL;
    if (!PyArg_ParseTuple(args, "OO|O", &unchanged, &error, &needs_text)) return NULL;
    if (needs_text) { Py_XDECREF(NEEDS_TEXT); Py_INCREF(needs_text); NEEDS_TEXT = needs_text; }
    Py_XDECREF(UNCHANGED);
    Py_XDECREF(DECODE_ERROR);
    Py_INCREF(unchanged);
    Py_INCREF(error);
    UNCHANGED = unchanged;
    DECODE_ERROR = error;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_change", decode_change, METH_O, "Decode an Insert/Update/Delete pgoutput message."},
    {"decode_copy_binary", decode_copy_binary, METH_VARARGS, "Decode a binary COPY stream into Arrow buffers."},
    {"configure", configure, METH_VARARGS, "Set the UNCHANGED marker, DecodeError and NeedsText types."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
