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

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *unchanged, *error;
    if (!PyArg_ParseTuple(args, "OO", &unchanged, &error)) return NULL;
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
    {"configure", configure, METH_VARARGS, "Set the UNCHANGED marker and the DecodeError type."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
