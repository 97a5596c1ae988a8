/*
 * _wsloop_speedups: optional C helper for wsloop.py.
 *
 * unmask(data, mask) -> bytes: XOR `data` with the 4-byte `mask` repeated
 * (RFC 6455 section 5.3).  wsloop.py uses it when it is importable and
 * falls back to its pure-Python unmask otherwise; both give the same bytes.
 * Built by `pip install .` when a C compiler is available (optional: the
 * install succeeds without it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *
unmask(PyObject *module, PyObject *args)
{
    Py_buffer data, mask;
    if (!PyArg_ParseTuple(args, "y*y*:unmask", &data, &mask)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (mask.len != 4) {
        PyErr_SetString(PyExc_ValueError, "mask must be 4 bytes");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL) {
        goto done;
    }
    const unsigned char *in = (const unsigned char *)data.buf;
    const unsigned char *key = (const unsigned char *)mask.buf;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    Py_ssize_t length = data.len, i = 0;

    /* Eight bytes at a time with the mask doubled into a 64-bit word; the
       compiler may widen this further.  memcpy keeps unaligned access legal. */
    uint32_t key32;
    memcpy(&key32, key, 4);
    uint64_t key64 = ((uint64_t)key32 << 32) | key32;
    for (; i + 8 <= length; i += 8) {
        uint64_t word;
        memcpy(&word, in + i, 8);
        word ^= key64;
        memcpy(out + i, &word, 8);
    }
    for (; i < length; i++) {
        out[i] = in[i] ^ key[i & 3];
    }
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&mask);
    return result;
}

static PyMethodDef methods[] = {
    {"unmask", unmask, METH_VARARGS, "XOR data with a 4-byte mask repeated (RFC 6455 5.3)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wsloop_speedups", "Optional C helpers for wsloop.", -1, methods,
};

PyMODINIT_FUNC
PyInit__wsloop_speedups(void)
{
    return PyModule_Create(&module);
}
