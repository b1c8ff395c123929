/* C fast path for the pgoutput hot loop: Insert/Update/Delete messages.
 *
 * Why: decoding TupleData is the one per-value loop on the CDC path; in Python
 * it caps CDC at a few tens of thousands of changes per second on one core.
 * The pure-Python decoder in pgoutput.py stays the reference: tests run both
 * on the same bytes and require identical results.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <poll.h>
#include <time.h>

static PyObject *UNCHANGED = NULL;
static PyObject *DECODE_ERROR = NULL;

static inline uint32_t rd32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static PyObject *fail(const char *msg) {
    PyErr_SetString(DECODE_ERROR ? DECODE_ERROR : PyExc_ValueError, msg);
    return NULL;
}

/* TupleData, one step at a time: the column count, then each column's kind and
 * (for 't'/'b') its bytes.  Every walker of a tuple (parse_tuple, the fold's key
 * scan, the stager) goes through these two, so the bounds checks live here once.
 * Both return 0, or -1 with DecodeError set. */
static int tuple_count(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *at, Py_ssize_t *n) {
    if (*at < 0 || *at + 2 > len) { fail("truncated tuple header"); return -1; }
    int16_t cnt = (int16_t)(((uint16_t)buf[*at] << 8) | buf[*at + 1]);
    *at += 2;
    if (cnt < 0) { fail("negative column count"); return -1; }
    *n = cnt;
    return 0;
}

static int tuple_value(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *at, unsigned char *kind,
                       const unsigned char **v, int32_t *l) {
    if (*at >= len) { fail("truncated tuple"); return -1; }
    *kind = buf[(*at)++];
    *v = NULL;
    *l = 0;
    if (*kind == 't' || *kind == 'b') {
        if (*at + 4 > len) { fail("truncated value length"); return -1; }
        *l = (int32_t)rd32(buf + *at);
        *at += 4;
        if (*l < 0 || *at + *l > len) { fail("truncated value"); return -1; }
        *v = buf + *at;
        *at += *l;
    } else if (*kind != 'n' && *kind != 'u') {
        fail("unknown tuple column kind");
        return -1;
    }
    return 0;
}

/* the Python value of one column: str ('t'), bytes ('b'), None, or the UNCHANGED marker */
static PyObject *value_object(unsigned char kind, const unsigned char *v, int32_t l) {
    if (kind == 't') return PyUnicode_DecodeUTF8((const char *)v, l, "strict");
    if (kind == 'b') return PyBytes_FromStringAndSize((const char *)v, l);
    PyObject *o = kind == 'u' ? UNCHANGED : Py_None;
    Py_INCREF(o);
    return o;
}

static PyObject *parse_tuple(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *pos, int *unchanged) {
    Py_ssize_t n;
    if (tuple_count(buf, len, pos, &n) < 0) return NULL;
    PyObject *list = PyList_New(n);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char kind;
        const unsigned char *v;
        int32_t l;
        PyObject *o;
        if (tuple_value(buf, len, pos, &kind, &v, &l) < 0 || !(o = value_object(kind, v, l))) {
            Py_DECREF(list);
            return NULL;
        }
        if (kind == 'u') *unchanged = 1;
        PyList_SET_ITEM(list, i, o);
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


/* fold_changes(msgs, start, tables, limit) -> (next, folded)
 *
 * The CDC fold for the common case, without a Python call per change: from
 * msgs[start], Insert/Update/Delete messages of the relids in ``tables``
 * (relid -> (pending dict, key positions)) are folded into their pending dict
 * as applying.TableApplier does, except that a row that stays is kept as the
 * message itself: key -> (0, message, None, offset of its new TupleData); a
 * deleted one is key -> (1, None, None).  Only the key's values become Python
 * objects (stage_values reads the rest straight from the message).  Stops
 * before the first message it leaves to Python: any other message type, a
 * relid not in ``tables``, an unchanged-TOAST marker, an update that changes
 * the key; and after a change that brings a pending dict to ``limit``
 * entries.  ``folded``: how many changes it folded. */
static PyObject *ZERO = NULL, *DELETED = NULL;

/* Walk one TupleData from *at; the values at the key positions ``kp`` become
 * ``key`` (the value itself for one column, else a tuple).  *unchanged: a 'u'
 * marker was seen.  Returns 0, or -1 with an exception set. */
static int scan_key(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *at, const Py_ssize_t *kp, Py_ssize_t nk,
                    PyObject **key, int *unchanged) {
    *key = NULL;
    Py_ssize_t n;
    if (tuple_count(buf, len, at, &n) < 0) return -1;
    PyObject *vals[8];
    PyObject **kv = nk <= 8 ? vals : PyMem_Calloc((size_t)nk, sizeof(PyObject *));
    if (!kv) { PyErr_NoMemory(); return -1; }
    for (Py_ssize_t j = 0; j < nk; j++) kv[j] = NULL;
    int rc = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char kind;
        const unsigned char *v;
        int32_t l;
        if (tuple_value(buf, len, at, &kind, &v, &l) < 0) goto out;
        if (kind == 'u') *unchanged = 1;
        for (Py_ssize_t j = 0; j < nk; j++) {
            if (kp[j] != i) continue;
            PyObject *o = value_object(kind, v, l);
            if (!o) goto out;
            Py_XDECREF(kv[j]);
            kv[j] = o;
        }
    }
    for (Py_ssize_t j = 0; j < nk; j++)
        if (!kv[j]) { fail("key column beyond the tuple"); goto out; }
    if (nk == 1) {
        *key = kv[0];
        kv[0] = NULL;
    } else {
        if (!(*key = PyTuple_New(nk))) goto out;
        for (Py_ssize_t j = 0; j < nk; j++) { PyTuple_SET_ITEM(*key, j, kv[j]); kv[j] = NULL; }
        PyObject_GC_UnTrack(*key);  /* strings only: no cycle through it (see fold_one) */
    }
    rc = 0;
out:
    for (Py_ssize_t j = 0; j < nk; j++) Py_XDECREF(kv[j]);
    if (kv != vals) PyMem_Free(kv);
    return rc;
}

/* 1: folded, 0: left to Python, -1: error */
static int fold_one(PyObject *msg, PyObject *tables, Py_ssize_t limit, int *full) {
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(msg);
    Py_ssize_t len = PyBytes_GET_SIZE(msg);
    if (len < 6) return 0;
    unsigned char tag = buf[0];
    if (tag != 'I' && tag != 'U' && tag != 'D') return 0;
    PyObject *relid = PyLong_FromUnsignedLong(rd32(buf + 1));
    if (!relid) return -1;
    PyObject *spec = PyDict_GetItemWithError(tables, relid);
    Py_DECREF(relid);
    if (!spec) return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 2 || !PyDict_Check(PyTuple_GET_ITEM(spec, 0))
        || !PyTuple_Check(PyTuple_GET_ITEM(spec, 1)) || PyTuple_GET_SIZE(PyTuple_GET_ITEM(spec, 1)) < 1) {
        PyErr_SetString(PyExc_TypeError, "tables: relid -> (pending dict, key positions)");
        return -1;
    }
    PyObject *pending = PyTuple_GET_ITEM(spec, 0), *pos = PyTuple_GET_ITEM(spec, 1);
    Py_ssize_t nk = PyTuple_GET_SIZE(pos);
    Py_ssize_t kp_small[8];
    Py_ssize_t *kp = nk <= 8 ? kp_small : PyMem_Malloc((size_t)nk * sizeof(Py_ssize_t));
    if (!kp) { PyErr_NoMemory(); return -1; }
    PyObject *old_key = NULL, *key = NULL, *entry = NULL, *offset = NULL;
    int unchanged = 0, rc = -1;
    for (Py_ssize_t j = 0; j < nk; j++) {
        kp[j] = PyLong_AsSsize_t(PyTuple_GET_ITEM(pos, j));
        if (kp[j] < 0) { if (!PyErr_Occurred()) fail("negative key position"); goto out; }
    }
    Py_ssize_t at = 5;
    unsigned char marker = buf[at++];
    if (tag != 'I' && (marker == 'K' || marker == 'O')) {
        if (scan_key(buf, len, &at, kp, nk, &old_key, &unchanged) < 0) goto out;
        if (unchanged) { rc = 0; goto out; }
        if (tag == 'U') {
            if (at >= len) { fail("update without new tuple"); goto out; }
            marker = buf[at++];
        }
    }
    if (tag == 'D') {
        if (!old_key) { fail("delete without old tuple"); goto out; }
        key = old_key;
        old_key = NULL;
        entry = DELETED;
        Py_INCREF(entry);
    } else {
        if (marker != 'N') { fail(tag == 'I' ? "insert without new tuple" : "update without new tuple"); goto out; }
        Py_ssize_t values_at = at;
        if (scan_key(buf, len, &at, kp, nk, &key, &unchanged) < 0) goto out;
        if (unchanged) { rc = 0; goto out; }
        if (old_key) {
            int same = PyObject_RichCompareBool(old_key, key, Py_EQ);
            if (same < 0) goto out;
            if (!same) { rc = 0; goto out; }
        }
        if (!(offset = PyLong_FromSsize_t(values_at))) goto out;
        if (!(entry = PyTuple_Pack(4, ZERO, msg, Py_None, offset))) goto out;
        /* ints, bytes and None: no cycle can pass through the entry, and a batch holds tens of
         * thousands; tracked, the loop's collections visited every one (measured on 270k
         * changes: 31 ms of collection, 14 ms with the entries untracked) */
        PyObject_GC_UnTrack(entry);
    }
    if (PyDict_SetItem(pending, key, entry) < 0) goto out;
    *full = PyDict_GET_SIZE(pending) >= limit;
    rc = 1;
out:
    if (kp != kp_small) PyMem_Free(kp);
    Py_XDECREF(old_key); Py_XDECREF(key); Py_XDECREF(entry); Py_XDECREF(offset);
    return rc;
}

static PyObject *fold_changes(PyObject *self, PyObject *args) {
    PyObject *msgs, *tables;
    Py_ssize_t start, limit;
    if (!PyArg_ParseTuple(args, "O!nO!n", &PyList_Type, &msgs, &start, &PyDict_Type, &tables, &limit)) return NULL;
    Py_ssize_t i = start < 0 ? 0 : start, n = PyList_GET_SIZE(msgs), folded = 0;
    for (; i < n; i++) {
        PyObject *m = PyList_GET_ITEM(msgs, i);
        if (!PyBytes_Check(m)) break;
        int full = 0;
        int r = fold_one(m, tables, limit, &full);
        if (r < 0) return NULL;
        if (r == 0) break;
        folded++;
        if (full) { i++; break; }
    }
    return Py_BuildValue("(nn)", i, folded);
}

/* ---------------------------------------------------------------------------
 * Binary COPY → Arrow buffers (the snapshot's fast path).
 *
 * copy_decode(pgconn_ptr, libpq_path, sql, kinds, scales[, sizes]) -> (nrows, [(validity, data, offsets|None), ...])
 * kinds: one byte per column (see snapshotting.py); scales: decimal scale per column;
 * sizes: a list the reader keeps between its chunks (3 ints per column): read as the
 * buffers to reserve, overwritten with this chunk's byte counts.
 * Raises NeedsText for values Arrow cannot hold (timestamps past DuckDB's end, intervals
 * beyond Arrow's nanoseconds): the caller then reads that chunk through the text path.
 * ±infinity dates and timestamps travel as the values DuckDB itself reads as ±infinity.
 *
 * The per-row work runs without the GIL (the other snapshot workers and DuckDB need
 * it); buffers come from the raw allocator and are handed to Arrow without a copy.
 * ------------------------------------------------------------------------- */

static PyObject *NEEDS_TEXT = NULL;

/* Column buffers of 64 KB or more are mapped pages of their own, grown with mremap.
 * Through malloc they raised glibc's dynamic mmap threshold and were then carved
 * from per-thread heaps that never shrink: the process grew by ~40 MB per million
 * rows snapshotted.
 *
 * When Arrow lets go of one, it goes to a small pool (at most POOL_BYTES, the newest
 * kept) instead of back to the kernel, and the next chunk's column of that size takes it: fresh
 * pages cost a fault and a zeroing each, which was a third of the faults of a
 * snapshot (~0.1 s of kernel time per million rows).  Sizes are rounded to
 * classes (quarter steps between powers of two) so that chunks of slightly
 * different sizes find each other's buffers. */
#if defined(__linux__)
#include <pthread.h>
#define MAP_MIN ((Py_ssize_t)1 << 16)
#define POOL_SLOTS 128
#define POOL_BYTES ((Py_ssize_t)64 << 20)
typedef struct { char *p; Py_ssize_t cap; } Mapping;
static struct {
    Mapping slot[POOL_SLOTS];  /* oldest first */
    int n;
    Py_ssize_t bytes;
    long long taken, missed, kept, dropped;  /* for pool_stats() */
    Py_ssize_t live;  /* bytes of mapped buffers in use (handed to Arrow or being filled) */
} pool;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

/* with pool_lock: take slot i out, keeping the others in age order */
static Mapping pool_remove(int i) {
    Mapping m = pool.slot[i];
    pool.bytes -= m.cap;
    pool.n--;
    memmove(pool.slot + i, pool.slot + i + 1, (pool.n - i) * sizeof pool.slot[0]);
    return m;
}

/* the smallest pooled mapping of at least cap bytes (and at most twice that): its size in *got */
static char *pool_take(Py_ssize_t cap, Py_ssize_t *got) {
    char *p = NULL;
    int best = -1;
    pthread_mutex_lock(&pool_lock);
    for (int i = 0; i < pool.n; i++) {
        Py_ssize_t c = pool.slot[i].cap;
        if (c >= cap && c <= 2 * cap && (best < 0 || c < pool.slot[best].cap)) best = i;
    }
    if (best >= 0) {
        Mapping m = pool_remove(best);
        p = m.p;
        *got = m.cap;
        pool.taken++;
    } else {
        pool.missed++;
    }
    pthread_mutex_unlock(&pool_lock);
    return p;
}

/* keeps the newest buffers: the oldest (of sizes no longer asked for) go back first */
static void pool_give(char *p, Py_ssize_t cap) {
    Mapping out[POOL_SLOTS + 1];
    int nout = 0;
    pthread_mutex_lock(&pool_lock);
    if (cap > POOL_BYTES) {
        out[nout++] = (Mapping){p, cap};
        pool.dropped++;
    } else {
        while (pool.n > 0 && (pool.n == POOL_SLOTS || pool.bytes + cap > POOL_BYTES)) {
            out[nout++] = pool_remove(0);
            pool.dropped++;
        }
        pool.slot[pool.n++] = (Mapping){p, cap};
        pool.bytes += cap;
        pool.kept++;
    }
    pthread_mutex_unlock(&pool_lock);
    for (int i = 0; i < nout; i++) munmap(out[i].p, out[i].cap);
}

static void live_add(Py_ssize_t n) {
    pthread_mutex_lock(&pool_lock);
    pool.live += n;
    pthread_mutex_unlock(&pool_lock);
}

/* pool_stats() -> (taken, missed, kept, dropped, pooled_bytes, live_bytes): how the pool
 * fared, and the bytes of column buffers alive (decoded, not yet let go by Arrow) */
static PyObject *pool_stats(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&pool_lock);
    long long taken = pool.taken, missed = pool.missed, kept = pool.kept, dropped = pool.dropped;
    Py_ssize_t bytes = pool.bytes, live = pool.live;
    pthread_mutex_unlock(&pool_lock);
    return Py_BuildValue("(LLLLnn)", taken, missed, kept, dropped, bytes, live);
}

/* pool_trim(): give every pooled buffer back to the kernel (a snapshot ended) */
static PyObject *pool_trim(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&pool_lock);
    while (pool.n > 0) {
        Mapping m = pool_remove(pool.n - 1);
        munmap(m.p, m.cap);
    }
    pthread_mutex_unlock(&pool_lock);
    Py_RETURN_NONE;
}
#else
#define MAP_MIN PY_SSIZE_T_MAX  /* no mremap: stay with malloc */
static PyObject *pool_trim(PyObject *self, PyObject *unused) { Py_RETURN_NONE; }
static PyObject *pool_stats(PyObject *self, PyObject *unused) { return Py_BuildValue("(iiiiii)", 0, 0, 0, 0, 0, 0); }
#endif

typedef struct { char *p; Py_ssize_t len, cap; int mapped; } Buf;

/* the size class at or above n: 2^k, 1.25·2^k, 1.5·2^k, 1.75·2^k (at least 4 KB) */
static Py_ssize_t size_class(Py_ssize_t n) {
    Py_ssize_t c = 4096;
    while (c < n) {
        Py_ssize_t q = c / 4;
        if (c + q >= n) return c + q;
        if (c + 2 * q >= n) return c + 2 * q;
        if (c + 3 * q >= n) return c + 3 * q;
        c *= 2;
    }
    return c;
}

static int buf_resize(Buf *b, Py_ssize_t cap) {
    char *np;
    if (cap < MAP_MIN) {
        np = PyMem_RawRealloc(b->p, cap);
        if (!np) return -1;
    }
#if defined(__linux__)
    else if (b->mapped) {
        np = mremap(b->p, b->cap, cap, MREMAP_MAYMOVE);
        if (np == MAP_FAILED) return -1;
        live_add(cap - b->cap);
    } else {
        np = pool_take(cap, &cap);
        if (!np) {
            np = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (np == MAP_FAILED) return -1;
        }
        live_add(cap);
        if (b->len) memcpy(np, b->p, b->len);
        PyMem_RawFree(b->p);
        b->mapped = 1;
    }
#endif
    b->p = np; b->cap = cap;
    return 0;
}

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    Py_ssize_t need = b->len + extra;
    if (need <= b->cap) return 0;
    return buf_resize(b, size_class(need > 2 * b->cap ? need : 2 * b->cap));
}

static void buf_free(Buf *b) {
#if defined(__linux__)
    if (b->mapped) { live_add(-b->cap); pool_give(b->p, b->cap); } else
#endif
    PyMem_RawFree(b->p);
    b->p = NULL; b->len = b->cap = 0; b->mapped = 0;
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

enum { D_OK = 0, D_FAIL, D_TEXT, D_NOMEM };
enum { S_HEADER = 0, S_ROWS, S_END };

typedef struct {
    int ncols;
    const char *kinds;
    int *scales;
    Col *cols;
    Py_ssize_t rows;
    int state, err;
    const char *msg;
} Decoder;

static int is_var(char k) { return k == 's' || k == 'j' || k == 'x' || k == 'y' || k == 'u'; }

static void decoder_free(Decoder *d) {
    if (d->cols)
        for (int i = 0; i < d->ncols; i++) {
            buf_free(&d->cols[i].valid); buf_free(&d->cols[i].data); buf_free(&d->cols[i].offsets);
        }
    PyMem_RawFree(d->cols);
    PyMem_RawFree(d->scales);
    d->cols = NULL; d->scales = NULL;
}

/* with the GIL: kinds stays alive in the caller's buffer.  sizes (a list of
 * 3·ncols ints or None): each column's validity/data/offsets byte counts from the
 * last chunk, to reserve at once (a little more: chunks vary) instead of growing. */
static int decoder_init(Decoder *d, const char *kinds, int ncols, PyObject *scales_obj, PyObject *sizes) {
    memset(d, 0, sizeof *d);
    d->ncols = ncols; d->kinds = kinds;
    d->cols = PyMem_RawCalloc(ncols ? ncols : 1, sizeof(Col));
    d->scales = PyMem_RawCalloc(ncols ? ncols : 1, sizeof(int));
    if (!d->cols || !d->scales) { decoder_free(d); PyErr_NoMemory(); return -1; }
    for (int i = 0; i < ncols; i++) {
        PyObject *it = PySequence_GetItem(scales_obj, i);
        if (!it) { decoder_free(d); return -1; }
        d->scales[i] = (int)PyLong_AsLong(it);
        Py_DECREF(it);
        if (sizes != Py_None) {
            Buf *bufs[3] = {&d->cols[i].valid, &d->cols[i].data, &d->cols[i].offsets};
            for (int k = 0; k < 3; k++) {
                Py_ssize_t n = PyLong_AsSsize_t(PyList_GET_ITEM(sizes, 3 * i + k));
                if (n < 0) { if (PyErr_Occurred()) { decoder_free(d); return -1; } n = 0; }
                if (n > 0 && buf_resize(bufs[k], size_class(n + n / 16)) < 0) { decoder_free(d); PyErr_NoMemory(); return -1; }
            }
        }
        int64_t zero = 0;
        if (is_var(kinds[i]) && buf_put(&d->cols[i].offsets, &zero, 8) < 0) { decoder_free(d); PyErr_NoMemory(); return -1; }
    }
    return 0;
}

/* the binary size of a fixed-size kind's values (0: variable, or checked where decoded) */
static inline int fixed_width(char k) {
    switch (k) {
    case 'b': return 1;
    case 'h': return 2;
    case 'i': case 'f': case 'D': return 4;
    case 'l': case 'd': case 'm': case 't': case 'T': return 8;
    default: return 0;
    }
}

#define DFAIL(code, text) do { d->err = (code); d->msg = (text); return -1; } while (0)
#define DPUT(call) do { if ((call) < 0) DFAIL(D_NOMEM, "out of memory"); } while (0)

/* One row whose bytes are all present (checked by the caller). */
static int decode_row(Decoder *d, const unsigned char *buf, Py_ssize_t pos) {
    Py_ssize_t rows = d->rows;
    for (int i = 0; i < d->ncols; i++) {
        int32_t n = (int32_t)rd32(buf + pos); pos += 4;
        const unsigned char *p = buf + pos;
        Col *c = &d->cols[i];
        int valid = n >= 0;
        int width = fixed_width(d->kinds[i]);
        if (valid && width && n != width) DFAIL(D_FAIL, "a COPY value does not have its column type's size");
        DPUT(set_valid(c, rows, valid));
        switch (d->kinds[i]) {
        case 'h': { int16_t v = valid ? (int16_t)rd16(p) : 0; DPUT(buf_put(&c->data, &v, 2)); break; }
        case 'i': case 'f': { uint32_t v = valid ? rd32(p) : 0; DPUT(buf_put(&c->data, &v, 4)); break; }
        case 'l': case 'd': case 'm': { uint64_t v = valid ? rd64(p) : 0; DPUT(buf_put(&c->data, &v, 8)); break; }
        case 'b': { uint8_t v = valid ? p[0] : 0; DPUT(buf_put(&c->data, &v, 1)); break; }
        case 'D': {
            /* ±infinity: DuckDB reads date32 INT32_MAX / -INT32_MAX as its own ±infinity */
            int32_t v = valid ? (int32_t)rd32(p) : 0;
            if (v == INT32_MIN) v = -INT32_MAX;
            else if (valid && v != INT32_MAX) v += (int32_t)PG_EPOCH_DAYS;
            DPUT(buf_put(&c->data, &v, 4));
            break;
        }
        case 't': case 'T': {
            /* ±infinity: DuckDB reads timestamp INT64_MAX / -INT64_MAX as its own ±infinity */
            int64_t v = valid ? (int64_t)rd64(p) : 0;
            if (v == INT64_MIN) v = -INT64_MAX;
            else if (valid && v != INT64_MAX) {
                /* DuckDB counts from 1970 and ends 30 years before PostgreSQL: never wrap, let
                   the text path report the value DuckDB cannot hold */
                if (v > INT64_MAX - 1 - PG_EPOCH_US) DFAIL(D_TEXT, "timestamp beyond DuckDB");
                v += PG_EPOCH_US;
            }
            DPUT(buf_put(&c->data, &v, 8));
            break;
        }
        case 'v': {
            /* PostgreSQL: int64 µs, int32 days, int32 months; Arrow: int32 months, int32 days, int64 ns */
            int32_t mo = 0, dy = 0; int64_t ns = 0;
            if (valid) {
                if (n != 16) DFAIL(D_FAIL, "bad interval");
                int64_t us = (int64_t)rd64(p);
                if (us > INT64_MAX / 1000 || us < INT64_MIN / 1000) DFAIL(D_TEXT, "interval");
                ns = us * 1000; dy = (int32_t)rd32(p + 8); mo = (int32_t)rd32(p + 12);
            }
            DPUT(buf_put(&c->data, &mo, 4)); DPUT(buf_put(&c->data, &dy, 4)); DPUT(buf_put(&c->data, &ns, 8));
            break;
        }
        case 'n': {
            __int128 v = 0; int is_null = 0;
            if (valid) {
                if (numeric_to_i128(p, n, d->scales[i], &v, &is_null) < 0) DFAIL(D_FAIL, "bad numeric");
                if (is_null) c->valid.p[rows >> 3] &= (char)~(1 << (rows & 7));
            }
            DPUT(buf_put(&c->data, &v, 16));
            break;
        }
        case 'u': {
            if (valid) {
                if (n != 16) DFAIL(D_FAIL, "bad uuid");
                static const char hex[] = "0123456789abcdef";
                unsigned char s[36]; int o = 0;
                for (int b = 0; b < 16; b++) {
                    if (b == 4 || b == 6 || b == 8 || b == 10) s[o++] = '-';
                    s[o++] = hex[p[b] >> 4]; s[o++] = hex[p[b] & 15];
                }
                DPUT(put_var(c, s, 36));
            } else DPUT(put_var(c, NULL, 0));
            break;
        }
        case 'j':  /* jsonb: a version byte, then the text */
            if (valid) {
                if (n < 1 || p[0] != 1) DFAIL(D_FAIL, "unknown jsonb version");
                DPUT(put_var(c, p + 1, n - 1));
            } else DPUT(put_var(c, NULL, 0));
            break;
        case 's': case 'x': case 'y':
            DPUT(put_var(c, p, valid ? n : 0));
            break;
        default:
            DFAIL(D_FAIL, "unknown column kind");
        }
        if (n > 0) pos += n;
    }
    d->rows++;
    return 0;
}

/* Decode the whole rows at the start of buf (no GIL needed); returns the bytes
   consumed (a partial row is left for the next call), or -1 with d->err set. */
static Py_ssize_t decode_rows(Decoder *d, const unsigned char *buf, Py_ssize_t len) {
    Py_ssize_t pos = 0;
    if (d->state == S_HEADER) {
        if (len < 19) return 0;
        if (memcmp(buf, "PGCOPY\n\377\r\n\0", 11) != 0) DFAIL(D_FAIL, "not a binary COPY stream");
        uint32_t ext = rd32(buf + 15);
        if (len < 19 + (Py_ssize_t)ext) return 0;
        pos = 19 + ext;
        d->state = S_ROWS;
    }
    while (d->state == S_ROWS) {
        if (pos + 2 > len) break;
        int16_t nf = (int16_t)rd16(buf + pos);
        if (nf == -1) { d->state = S_END; pos += 2; break; }
        if (nf != d->ncols) DFAIL(D_FAIL, "COPY row has an unexpected number of fields");
        Py_ssize_t q = pos + 2;  /* is the whole row here? */
        int complete = 1;
        for (int i = 0; i < d->ncols; i++) {
            if (q + 4 > len) { complete = 0; break; }
            int32_t n = (int32_t)rd32(buf + q); q += 4;
            if (n > 0) q += n;
            if (q > len) { complete = 0; break; }
        }
        if (!complete) break;
        if (decode_row(d, buf, pos + 2) < 0) return -1;
        pos = q;
    }
    return pos;
}

/* -- handing buffers to Arrow without a copy -------------------------------- */

typedef struct { PyObject_HEAD Buf buf; } Owned;

static void owned_dealloc(Owned *o) { buf_free(&o->buf); Py_TYPE(o)->tp_free((PyObject *)o); }
static int owned_getbuffer(Owned *o, Py_buffer *view, int flags) {
    static char empty[1];
    return PyBuffer_FillInfo(view, (PyObject *)o, o->buf.p ? o->buf.p : empty, o->buf.len, 1, flags);
}
static PyBufferProcs owned_as_buffer = {(getbufferproc)owned_getbuffer, NULL};
static PyTypeObject OwnedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "datasync.engine._speedups.Owned",
    .tp_basicsize = sizeof(Owned),
    .tp_dealloc = (destructor)owned_dealloc,
    .tp_as_buffer = &owned_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
};

static PyObject *own(Buf *b) {  /* takes the buffer */
    Owned *o = PyObject_New(Owned, &OwnedType);
    if (!o) return NULL;
    o->buf = *b;
    b->p = NULL; b->len = b->cap = 0; b->mapped = 0;
    return (PyObject *)o;
}

/* with the GIL: raise d's error, or build (nrows, [(validity, data, offsets|None), ...]) */
static PyObject *decoder_result(Decoder *d) {
    if (d->err == D_NOMEM) return PyErr_NoMemory();
    if (d->err == D_TEXT) { PyErr_SetString(NEEDS_TEXT ? NEEDS_TEXT : PyExc_ValueError, d->msg); return NULL; }
    if (d->err) return fail(d->msg);
    PyObject *list = PyList_New(d->ncols);
    if (!list) return NULL;
    for (int i = 0; i < d->ncols; i++) {
        Col *c = &d->cols[i];
        PyObject *valid = own(&c->valid), *data = own(&c->data);
        PyObject *offs = is_var(d->kinds[i]) ? own(&c->offsets) : (Py_INCREF(Py_None), Py_None);
        PyObject *triple = (valid && data && offs) ? PyTuple_Pack(3, valid, data, offs) : NULL;
        Py_XDECREF(valid); Py_XDECREF(data); Py_XDECREF(offs);
        if (!triple) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, triple);
    }
    PyObject *result = Py_BuildValue("(nN)", d->rows, list);
    return result;
}

/* Binary COPY straight from libpq, decoded as it arrives, without the GIL.
 *
 * Why: psycopg2's copy_expert calls the file's write() once per row (a Python
 * call, a bytes object and a BytesIO append each: ~0.5 s of CPU per million
 * rows, holding the GIL the other snapshot workers need), and the stream was
 * then copied twice more before Arrow saw it.  Here the per-row loop is
 * PQgetCopyData → decode_rows.  libpq is the one psycopg2 has already loaded
 * (looked up through its module's dependencies), and the connection is
 * psycopg2's own (``conn.pgconn_ptr``), inside its transaction.
 */
typedef struct pg_conn PGconn;
typedef struct pg_result PGresult;
typedef PGresult *(*PQexec_t)(PGconn *, const char *);
typedef int (*PQresultStatus_t)(const PGresult *);
typedef void (*PQclear_t)(PGresult *);
typedef int (*PQgetCopyData_t)(PGconn *, char **, int);
typedef void (*PQfreemem_t)(void *);
typedef PGresult *(*PQgetResult_t)(PGconn *);
typedef char *(*PQresultErrorMessage_t)(const PGresult *);
typedef char *(*PQerrorMessage_t)(const PGconn *);
typedef int (*PQconsumeInput_t)(PGconn *);
typedef int (*PQsocket_t)(const PGconn *);
typedef int (*PQputCopyData_t)(PGconn *, const char *, int);
typedef int (*PQflush_t)(PGconn *);
static struct {
    int loaded;
    PQexec_t exec; PQresultStatus_t status; PQclear_t clear; PQgetCopyData_t get_copy_data;
    PQfreemem_t freemem; PQgetResult_t get_result; PQresultErrorMessage_t result_error; PQerrorMessage_t error;
    PQconsumeInput_t consume_input; PQsocket_t socket; PQputCopyData_t put_copy_data; PQflush_t flush;
} pq;
enum { PGRES_COMMAND_OK_ = 1, PGRES_COPY_OUT_ = 3 };

static int load_libpq(const char *path) {
    if (pq.loaded) return 0;
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (!h) { PyErr_Format(PyExc_ImportError, "%s is not loaded: %s", path, dlerror()); return -1; }
#define SYM(field, name) if (!(*(void **)&pq.field = dlsym(h, name))) { \
        PyErr_Format(PyExc_ImportError, "libpq symbol %s not found", name); return -1; }
    SYM(exec, "PQexec") SYM(status, "PQresultStatus") SYM(clear, "PQclear") SYM(get_copy_data, "PQgetCopyData")
    SYM(freemem, "PQfreemem") SYM(get_result, "PQgetResult") SYM(result_error, "PQresultErrorMessage")
    SYM(error, "PQerrorMessage") SYM(consume_input, "PQconsumeInput") SYM(socket, "PQsocket")
    SYM(put_copy_data, "PQputCopyData") SYM(flush, "PQflush")
#undef SYM
    pq.loaded = 1;
    return 0;
}

static PyObject *copy_decode(PyObject *self, PyObject *args) {
    unsigned long long ptr;
    const char *lib, *sql;
    Py_buffer kview;
    PyObject *scales_obj, *sizes = Py_None, *result = NULL;
    if (!PyArg_ParseTuple(args, "Kssy*O|O", &ptr, &lib, &sql, &kview, &scales_obj, &sizes)) return NULL;
    if (sizes != Py_None && (!PyList_Check(sizes) || PyList_GET_SIZE(sizes) != 3 * kview.len)) {
        PyBuffer_Release(&kview);
        PyErr_SetString(PyExc_ValueError, "sizes must be None or a list of 3 ints per column");
        return NULL;
    }
    if (load_libpq(lib) < 0) { PyBuffer_Release(&kview); return NULL; }
    Decoder d;
    if (decoder_init(&d, kview.buf, (int)kview.len, scales_obj, sizes) < 0) { PyBuffer_Release(&kview); return NULL; }
    PGconn *conn = (PGconn *)(uintptr_t)ptr;
    char *err = NULL;
    Buf carry = {0};
    int oom = 0;
    Py_BEGIN_ALLOW_THREADS
    PGresult *res = pq.exec(conn, sql);
    if (pq.status(res) != PGRES_COPY_OUT_) {
        err = strdup(pq.result_error(res)[0] ? pq.result_error(res) : pq.error(conn));
        pq.clear(res);
        while ((res = pq.get_result(conn)) != NULL) pq.clear(res);
    } else {
        pq.clear(res);
        char *msg;
        int n;
        while ((n = pq.get_copy_data(conn, &msg, 0)) > 0) {
            if (!d.err && !oom) {  /* after an error: drain the stream, keep the connection usable */
                if (carry.len == 0) {  /* PostgreSQL sends whole rows per message: the usual case */
                    Py_ssize_t used = decode_rows(&d, (unsigned char *)msg, n);
                    if (used >= 0 && used < n && buf_put(&carry, msg + used, n - used) < 0) oom = 1;
                } else if (buf_put(&carry, msg, n) < 0) {
                    oom = 1;
                } else {
                    Py_ssize_t used = decode_rows(&d, (unsigned char *)carry.p, carry.len);
                    if (used > 0) { memmove(carry.p, carry.p + used, carry.len - used); carry.len -= used; }
                }
            }
            pq.freemem(msg);
        }
        if (n == -2) err = strdup(pq.error(conn));
        while ((res = pq.get_result(conn)) != NULL) {
            if (!err && pq.status(res) != PGRES_COMMAND_OK_) err = strdup(pq.result_error(res));
            pq.clear(res);
        }
    }
    Py_END_ALLOW_THREADS
    buf_free(&carry);
    if (err) PyErr_SetString(PyExc_RuntimeError, err);
    else if (oom) PyErr_NoMemory();
    else {
        if (!d.err && (d.state != S_END || carry.len)) { d.err = D_FAIL; d.msg = "truncated COPY stream"; }
        if (!d.err && sizes != Py_None)
            for (int i = 0; i < d.ncols; i++) {
                Buf *bufs[3] = {&d.cols[i].valid, &d.cols[i].data, &d.cols[i].offsets};
                for (int k = 0; k < 3; k++) {
                    PyObject *n = PyLong_FromSsize_t(bufs[k]->len);
                    if (!n || PyList_SetItem(sizes, 3 * i + k, n) < 0) { decoder_free(&d); PyBuffer_Release(&kview); return NULL; }
                }
            }
        result = decoder_result(&d);
    }
    free(err);
    decoder_free(&d);
    PyBuffer_Release(&kview);
    return result;
}

/* ---------------------------------------------------------------------------
 * The replication stream (COPY BOTH after START_REPLICATION), read from libpq.
 *
 * Why: psycopg2's read_message costs ~5 µs per message in Python (a message
 * object, its attributes, a bytes copy) and holds the GIL while doing it; on
 * 2 cores that was as much CPU as the whole apply, and the walsender is already
 * the source's limit.  Here messages are taken from libpq without the GIL and
 * only the payload bytes are made with it.  The connection is psycopg2's, after
 * its start_replication; psycopg2 reads nothing from it afterwards.
 *
 * replication_read(pgconn_ptr, libpq_path, max_messages, timeout)
 *     -> (payloads, wal_end, reply_requested)
 * Waits up to ``timeout`` seconds for the first message (or a keepalive), then
 * takes what is buffered (up to ``max_messages``).  wal_end: the walEnd field of the latest
 * XLogData or keepalive seen (0: none).  Raises ConnectionError when the
 * stream ends or breaks.
 * ------------------------------------------------------------------------- */
enum { READ_CHUNK = 512 };

static PyObject *replication_read(PyObject *self, PyObject *args) {
    unsigned long long ptr;
    const char *lib;
    Py_ssize_t max_messages;
    double timeout;
    if (!PyArg_ParseTuple(args, "Ksnd", &ptr, &lib, &max_messages, &timeout)) return NULL;
    if (load_libpq(lib) < 0) return NULL;
    PGconn *conn = (PGconn *)(uintptr_t)ptr;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    uint64_t wal_end = 0;
    int reply = 0, waited = timeout <= 0, done = 0, keepalive = 0;
    char *err = NULL;
    char *bufs[READ_CHUNK];
    int lens[READ_CHUNK];
    Py_ssize_t got = 0;
    while (!done && got < max_messages) {
        int k = 0;
        Py_BEGIN_ALLOW_THREADS
        int consumed = 0;
        while (k < READ_CHUNK && got + k < max_messages) {
            char *buf;
            int n = pq.get_copy_data(conn, &buf, 1);
            if (n > 0) {
                consumed = 0;
                if (buf[0] == 'w' && n >= 25) {
                    wal_end = rd64((unsigned char *)buf + 9);
                    bufs[k] = buf; lens[k] = n; k++;
                    continue;
                }
                if (buf[0] == 'k' && n >= 18) {
                    wal_end = rd64((unsigned char *)buf + 1);
                    if (buf[17]) reply = 1;
                    keepalive = 1;
                }
                pq.freemem(buf);
                continue;
            }
            if (n == 0) {
                if (!consumed) {  /* read what the socket holds, then look again */
                    if (!pq.consume_input(conn)) { err = strdup(pq.error(conn)); done = 1; break; }
                    consumed = 1;
                    continue;
                }
                /* a keepalive answers too: the caller learns how far the server has sent */
                if (k > 0 || got > 0 || waited || keepalive) { done = 1; break; }
                struct pollfd pfd = {pq.socket(conn), POLLIN, 0};
                if (pfd.fd < 0) { err = strdup("connection is closed"); done = 1; break; }
                poll(&pfd, 1, (int)(timeout * 1000));
                waited = 1;
                consumed = 0;
                continue;
            }
            /* -1: the server ended the stream; -2: the connection broke */
            err = strdup(n == -1 ? "the server ended the replication stream" : pq.error(conn));
            done = 1;
            break;
        }
        Py_END_ALLOW_THREADS
        int failed = 0;
        for (int i = 0; i < k; i++) {
            if (!failed) {
                PyObject *b = PyBytes_FromStringAndSize(bufs[i] + 25, lens[i] - 25);
                if (!b || PyList_Append(out, b) < 0) failed = 1;
                Py_XDECREF(b);
            }
            pq.freemem(bufs[i]);
        }
        got += k;
        if (failed) { free(err); Py_DECREF(out); return NULL; }
    }
    if (err) {
        PyErr_SetString(PyExc_ConnectionError, err[0] ? err : "replication stream lost");
        free(err);
        Py_DECREF(out);
        return NULL;
    }
    return Py_BuildValue("(NKO)", out, (unsigned long long)wal_end, reply ? Py_True : Py_False);
}

/* replication_status(pgconn_ptr, libpq_path, lsn, reply): a standby status update
 * (write = flush = apply = lsn); reply asks the server for a keepalive back. */
static PyObject *replication_status(PyObject *self, PyObject *args) {
    unsigned long long ptr, lsn;
    const char *lib;
    int reply;
    if (!PyArg_ParseTuple(args, "KsKp", &ptr, &lib, &lsn, &reply)) return NULL;
    if (load_libpq(lib) < 0) return NULL;
    PGconn *conn = (PGconn *)(uintptr_t)ptr;
    unsigned char msg[34];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t now = (uint64_t)((int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000 - PG_EPOCH_US);
    msg[0] = 'r';
    for (int f = 0; f < 4; f++) {
        uint64_t v = f < 3 ? lsn : now;
        for (int b = 0; b < 8; b++) msg[1 + f * 8 + b] = (unsigned char)(v >> (56 - 8 * b));
    }
    msg[33] = reply ? 1 : 0;
    char *err = NULL;
    Py_BEGIN_ALLOW_THREADS
    if (pq.put_copy_data(conn, (const char *)msg, sizeof msg) != 1 || pq.flush(conn) != 0) err = strdup(pq.error(conn));
    Py_END_ALLOW_THREADS
    if (err) {
        PyErr_SetString(PyExc_ConnectionError, err[0] ? err : "replication stream lost");
        free(err);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Arrow large_string columns built row by row: ``ncols`` of them, handed to Python as
 * [(validity, offsets, data), ...] (the buffers are given to Arrow, not copied). */
static Col *strings_new(int ncols) {
    Col *cols = PyMem_Calloc((size_t)ncols, sizeof(Col));
    if (!cols) { PyErr_NoMemory(); return NULL; }
    int64_t zero = 0;
    for (int c = 0; c < ncols; c++)
        if (buf_put(&cols[c].offsets, &zero, 8) < 0) {
            for (int k = 0; k <= c; k++) buf_free(&cols[k].offsets);
            PyMem_Free(cols);
            PyErr_NoMemory();
            return NULL;
        }
    return cols;
}

static void strings_free(Col *cols, int ncols) {
    for (int c = 0; c < ncols; c++) { buf_free(&cols[c].valid); buf_free(&cols[c].offsets); buf_free(&cols[c].data); }
    PyMem_Free(cols);
}

/* row ``r`` of column ``c``: the bytes ``v`` (NULL: a null) */
static int strings_put(Col *c, Py_ssize_t r, const unsigned char *v, int32_t l) {
    if (set_valid(c, r, v != NULL) < 0 || put_var(c, v, v ? l : 0) < 0) { PyErr_NoMemory(); return -1; }
    return 0;
}

/* a str as UTF-8, anything else (None, the unchanged-TOAST marker) as null */
static int strings_put_object(Col *c, Py_ssize_t r, PyObject *v) {
    if (!PyUnicode_Check(v)) return strings_put(c, r, NULL, 0);
    Py_ssize_t l;
    const char *u = PyUnicode_AsUTF8AndSize(v, &l);
    return u ? strings_put(c, r, (const unsigned char *)u, (int32_t)l) : -1;
}

/* takes the buffers (frees them on failure) */
static PyObject *strings_result(Col *cols, int ncols) {
    PyObject *out = PyList_New(ncols);
    for (int c = 0; out && c < ncols; c++) {
        PyObject *valid = own(&cols[c].valid), *offs = own(&cols[c].offsets), *data = own(&cols[c].data);
        PyObject *triple = (valid && offs && data) ? PyTuple_Pack(3, valid, offs, data) : NULL;
        Py_XDECREF(valid); Py_XDECREF(offs); Py_XDECREF(data);
        if (!triple) Py_CLEAR(out);
        else PyList_SET_ITEM(out, c, triple);
    }
    strings_free(cols, ncols);  /* what own() took is already gone from here */
    return out;
}

/* row r of ncols columns from a list or tuple of str/None (None as the row: all null) */
static int strings_put_row(Col *cols, int ncols, Py_ssize_t r, PyObject *row) {
    int is_list = PyList_Check(row), is_tuple = PyTuple_Check(row);
    if (row != Py_None && !is_list && !is_tuple) { PyErr_SetString(PyExc_TypeError, "a row is a list, tuple or None"); return -1; }
    Py_ssize_t have = row == Py_None ? ncols : is_list ? PyList_GET_SIZE(row) : PyTuple_GET_SIZE(row);
    if (have < ncols) { PyErr_SetString(PyExc_ValueError, "row too short"); return -1; }
    for (int c = 0; c < ncols; c++) {
        PyObject *v = row == Py_None ? Py_None : is_list ? PyList_GET_ITEM(row, c) : PyTuple_GET_ITEM(row, c);
        if (strings_put_object(&cols[c], r, v) < 0) return -1;
    }
    return 0;
}

/* text_columns(rows, ncols) -> [(validity, offsets, data), ...]: Arrow large_string
 * columns from rows of str/None (lists or tuples; None as a row: all null; any other
 * value, e.g. the unchanged-TOAST marker, is null).  ncols == 0: each row is one
 * value (the fold's keys).  Why: transposing 100k rows in Python and converting each
 * column with pa.array cost more than DuckDB's whole apply of the batch. */
static PyObject *text_columns(PyObject *self, PyObject *args) {
    PyObject *rows;
    int ncols;
    if (!PyArg_ParseTuple(args, "O!i", &PyList_Type, &rows, &ncols)) return NULL;
    int width = ncols ? ncols : 1;
    Col *cols = strings_new(width);
    if (!cols) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(rows);
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *row = PyList_GET_ITEM(rows, r);
        if (ncols ? strings_put_row(cols, ncols, r, row) < 0 : strings_put_object(&cols[0], r, row) < 0) goto fail;
    }
    return strings_result(cols, width);
fail:
    strings_free(cols, width);
    return NULL;
}

/* stage_values(entries, ncols) -> [(validity, offsets, data), ...]: Arrow large_string
 * columns of the folded rows.  An entry's values are None (a deleted row: all null),
 * a list of str/None (other values: null), or a pgoutput message whose TupleData
 * starts at entry[3] (as fold_changes keeps them): values are copied from it
 * without becoming Python objects. */
static PyObject *stage_values(PyObject *self, PyObject *args) {
    PyObject *entries;
    int ncols;
    if (!PyArg_ParseTuple(args, "O!i", &PyList_Type, &entries, &ncols)) return NULL;
    if (ncols < 1) { PyErr_SetString(PyExc_ValueError, "ncols must be positive"); return NULL; }
    Col *cols = strings_new(ncols);
    if (!cols) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(entries);
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *e = PyList_GET_ITEM(entries, r);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) < 2) { PyErr_SetString(PyExc_TypeError, "entries are tuples"); goto fail; }
        PyObject *vals = PyTuple_GET_ITEM(e, 1);
        if (PyBytes_Check(vals)) {
            if (PyTuple_GET_SIZE(e) < 4) { PyErr_SetString(PyExc_TypeError, "a message entry needs its offset"); goto fail; }
            Py_ssize_t at = PyLong_AsSsize_t(PyTuple_GET_ITEM(e, 3)), cnt;
            if (at < 0 && PyErr_Occurred()) goto fail;
            const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(vals);
            Py_ssize_t len = PyBytes_GET_SIZE(vals);
            if (tuple_count(buf, len, &at, &cnt) < 0) goto fail;
            if (cnt != ncols) { fail("tuple column count differs from the table's"); goto fail; }
            for (int c = 0; c < ncols; c++) {
                unsigned char kind;
                const unsigned char *v;
                int32_t l;
                if (tuple_value(buf, len, &at, &kind, &v, &l) < 0 || strings_put(&cols[c], r, v, l) < 0) goto fail;
            }
            continue;
        }
        if (vals != Py_None && !PyList_Check(vals)) {
            PyErr_SetString(PyExc_TypeError, "row values: list, message or None");
            goto fail;
        }
        if (strings_put_row(cols, ncols, r, vals) < 0) goto fail;
    }
    return strings_result(cols, ncols);
fail:
    strings_free(cols, ncols);
    return NULL;
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
    {"copy_decode", copy_decode, METH_VARARGS, "Run a binary COPY ... TO STDOUT on a psycopg2 connection's libpq handle, decoded."},
    {"pool_trim", pool_trim, METH_NOARGS, "Give the pooled column buffers back to the kernel."},
    {"pool_stats", pool_stats, METH_NOARGS, "(taken, missed, kept, dropped, pooled_bytes) of the column buffer pool."},
    {"replication_read", replication_read, METH_VARARGS, "Read replication stream messages from a psycopg2 connection's libpq handle."},
    {"replication_status", replication_status, METH_VARARGS, "Send a standby status update on a replication connection."},
    {"fold_changes", fold_changes, METH_VARARGS, "Fold Insert/Update/Delete messages into pending dicts."},
    {"stage_values", stage_values, METH_VARARGS, "Arrow large_string columns from folded entries (lists or messages)."},
    {"text_columns", text_columns, METH_VARARGS, "Arrow large_string columns from rows of str/None."},
    {"configure", configure, METH_VARARGS, "Set the UNCHANGED marker, DecodeError and NeedsText types."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (PyType_Ready(&OwnedType) < 0) return NULL;
    if (!ZERO && !(ZERO = PyLong_FromLong(0))) return NULL;
    if (!DELETED && !(DELETED = Py_BuildValue("(iOO)", 1, Py_None, Py_None))) return NULL;
    return PyModule_Create(&module);
}
