/* Compiled fast paths for the data plane's per-request work, with the same behaviour as the
 * pure-Python versions they stand in for (gateway/upstream/connection.py, scan_fields_py).
 * Built when a C compiler is present (setup.py: an optional extension); the gateway runs the
 * Python versions otherwise. tests/unit/test_speedups.py checks the two agree.
 *
 * Inputs are bytes llhttp has already accepted, but nothing here relies on that for memory
 * safety: every read is bounded by the object's size.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>


/* -- RequestFields: the client side's on_header ------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_ssize_t size, count, max_bytes, max_count;
    Py_ssize_t host_count, length_count, te_count;
    PyObject *host, *length, *te;     /* bytes, never NULL */
    PyObject *expect, *rid;           /* bytes or None, never NULL */
    PyObject *connection, *xff;       /* list or None, never NULL */
    PyObject *items;                  /* list or None */
    PyObject *rid_name;               /* bytes, lower case */
    PyObject *reject;                 /* callable making the exception to raise */
} RequestFields;

static PyObject *empty_bytes;

static void
rf_clear_values(RequestFields *self)
{
    self->size = self->count = self->host_count = self->length_count = self->te_count = 0;
    Py_XSETREF(self->host, Py_NewRef(empty_bytes));
    Py_XSETREF(self->length, Py_NewRef(empty_bytes));
    Py_XSETREF(self->te, Py_NewRef(empty_bytes));
    Py_XSETREF(self->expect, Py_NewRef(Py_None));
    Py_XSETREF(self->rid, Py_NewRef(Py_None));
    Py_XSETREF(self->connection, Py_NewRef(Py_None));
    Py_XSETREF(self->xff, Py_NewRef(Py_None));
}

static int
rf_init(RequestFields *self, PyObject *args, PyObject *kwds)
{
    Py_ssize_t max_bytes, max_count;
    PyObject *rid_name, *reject;
    static char *kwlist[] = {"max_bytes", "max_count", "rid_name", "reject", NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nnSO:RequestFields", kwlist, &max_bytes,
                                     &max_count, &rid_name, &reject))
        return -1;
    self->max_bytes = max_bytes;
    self->max_count = max_count;
    Py_XSETREF(self->rid_name, Py_NewRef(rid_name));
    Py_XSETREF(self->reject, Py_NewRef(reject));
    Py_XSETREF(self->items, Py_NewRef(Py_None));
    rf_clear_values(self);
    return 0;
}

/* Every object field, for the GC's traverse and clear. */
#define RF_OBJECTS(X) \
    X(host) X(length) X(te) X(expect) X(rid) X(connection) X(xff) X(items) X(rid_name) X(reject)

static int
rf_traverse(RequestFields *self, visitproc visit, void *arg)
{
#define RF_VISIT(field) Py_VISIT(self->field);
    RF_OBJECTS(RF_VISIT)
#undef RF_VISIT
    return 0;
}

static int
rf_clear(RequestFields *self)
{
#define RF_CLEAR(field) Py_CLEAR(self->field);
    RF_OBJECTS(RF_CLEAR)
#undef RF_CLEAR
    return 0;
}

static void
rf_dealloc(RequestFields *self)
{
    PyObject_GC_UnTrack(self);
    rf_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Whether __init__ ran (the type can be made without it). */
static int
rf_ready(RequestFields *self)
{
    if (self->reject == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RequestFields.__init__ was not called");
        return 0;
    }
    return 1;
}

static PyObject *
rf_reset(RequestFields *self, PyObject *items)
{
    if (!rf_ready(self))
        return NULL;
    if (items != Py_None && !PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "reset() takes a list or None");
        return NULL;
    }
    Py_XSETREF(self->items, Py_NewRef(items));
    rf_clear_values(self);
    Py_RETURN_NONE;
}

/* Append value to the list in *slot (None: a new list). */
static int
append_to(PyObject **slot, PyObject *value)
{
    PyObject *list;
    if (*slot == Py_None) {
        list = PyList_New(1);
        if (list == NULL)
            return -1;
        PyList_SET_ITEM(list, 0, Py_NewRef(value));
        Py_SETREF(*slot, list);
        return 0;
    }
    return PyList_Append(*slot, value);
}

static PyObject *
rf_on_header(RequestFields *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *name, *value, *lname, *triple, *exc, *items;
    const char *src;
    char *dst;
    Py_ssize_t n, i;
    int rc;

    if (!rf_ready(self))
        return NULL;
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "on_header() takes two bytes");
        return NULL;
    }
    name = args[0];
    value = args[1];
    n = PyBytes_GET_SIZE(name);
    self->size += n + PyBytes_GET_SIZE(value) + 4;
    self->count += 1;
    if (self->size > self->max_bytes || self->count > self->max_count) {
        PyObject *reject = Py_NewRef(self->reject);  /* held across the call */
        if (self->size > self->max_bytes)
            exc = PyObject_CallFunction(reject, "s", "header_fields_too_large");
        else
            exc = PyObject_CallFunction(reject, "ss", "header_fields_too_large",
                                        "too many request header fields");
        Py_DECREF(reject);
        if (exc == NULL)
            return NULL;
        if (!PyExceptionInstance_Check(exc))
            PyErr_SetString(PyExc_TypeError, "reject() must return an exception");
        else
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
        return NULL;
    }
    items = self->items;
    if (items == Py_None)
        Py_RETURN_NONE;  /* a trailer field of a chunked body: counted, not kept */
    /* Held: an allocation can run the GC, and through it code that replaces self->items. */
    Py_INCREF(items);
    lname = PyBytes_FromStringAndSize(NULL, n);
    if (lname == NULL) {
        Py_DECREF(items);
        return NULL;
    }
    src = PyBytes_AS_STRING(name);
    dst = PyBytes_AS_STRING(lname);
    for (i = 0; i < n; i++) {
        char c = src[i];
        dst[i] = (c >= 'A' && c <= 'Z') ? (char)(c + ('a' - 'A')) : c;
    }
    triple = PyTuple_Pack(3, lname, name, value);
    if (triple == NULL) {
        Py_DECREF(items);
        Py_DECREF(lname);
        return NULL;
    }
    rc = PyList_Append(items, triple);
    Py_DECREF(items);
    Py_DECREF(triple);
    if (rc < 0) {
        Py_DECREF(lname);
        return NULL;
    }
    rc = 0;
    if (n == 4 && memcmp(dst, "host", 4) == 0) {
        self->host_count++;
        Py_SETREF(self->host, Py_NewRef(value));
    }
    else if (n == 14 && memcmp(dst, "content-length", 14) == 0) {
        self->length_count++;
        Py_SETREF(self->length, Py_NewRef(value));
    }
    else if (n == 17 && memcmp(dst, "transfer-encoding", 17) == 0) {
        self->te_count++;
        Py_SETREF(self->te, Py_NewRef(value));
    }
    else if (n == 10 && memcmp(dst, "connection", 10) == 0) {
        rc = append_to(&self->connection, value);
    }
    else if (n == 6 && memcmp(dst, "expect", 6) == 0) {
        Py_SETREF(self->expect, Py_NewRef(value));
    }
    else if (n == 15 && memcmp(dst, "x-forwarded-for", 15) == 0) {
        rc = append_to(&self->xff, value);
    }
    else if (n == PyBytes_GET_SIZE(self->rid_name)
             && memcmp(dst, PyBytes_AS_STRING(self->rid_name), (size_t)n) == 0) {
        Py_SETREF(self->rid, Py_NewRef(value));
    }
    Py_DECREF(lname);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int
rf_set_items(RequestFields *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || (value != Py_None && !PyList_Check(value))) {
        PyErr_SetString(PyExc_TypeError, "items must be a list or None");
        return -1;
    }
    Py_XSETREF(self->items, Py_NewRef(value));
    return 0;
}

static PyObject *
rf_get_items(RequestFields *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->items != NULL ? self->items : Py_None);
}

static PyMethodDef rf_methods[] = {
    {"reset", (PyCFunction)rf_reset, METH_O, "reset(items): start a request's head"},
    {"on_header", (PyCFunction)(void (*)(void))rf_on_header, METH_FASTCALL,
     "on_header(name, value): httptools' callback"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef rf_members[] = {
    {"size", T_PYSSIZET, offsetof(RequestFields, size), 0, "the head's bytes so far"},
    {"count", T_PYSSIZET, offsetof(RequestFields, count), READONLY, NULL},
    {"max_bytes", T_PYSSIZET, offsetof(RequestFields, max_bytes), READONLY, NULL},
    {"max_count", T_PYSSIZET, offsetof(RequestFields, max_count), READONLY, NULL},
    {"host_count", T_PYSSIZET, offsetof(RequestFields, host_count), READONLY, NULL},
    {"length_count", T_PYSSIZET, offsetof(RequestFields, length_count), READONLY, NULL},
    {"te_count", T_PYSSIZET, offsetof(RequestFields, te_count), READONLY, NULL},
    {"host", T_OBJECT_EX, offsetof(RequestFields, host), READONLY, NULL},
    {"length", T_OBJECT_EX, offsetof(RequestFields, length), READONLY, NULL},
    {"te", T_OBJECT_EX, offsetof(RequestFields, te), READONLY, NULL},
    {"expect", T_OBJECT_EX, offsetof(RequestFields, expect), READONLY, NULL},
    {"rid", T_OBJECT_EX, offsetof(RequestFields, rid), READONLY, NULL},
    {"connection", T_OBJECT_EX, offsetof(RequestFields, connection), READONLY, NULL},
    {"xff", T_OBJECT_EX, offsetof(RequestFields, xff), READONLY, NULL},
    {"rid_name", T_OBJECT_EX, offsetof(RequestFields, rid_name), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef rf_getset[] = {
    {"items", (getter)rf_get_items, (setter)rf_set_items, "the request's triples, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RequestFieldsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._speedups.RequestFields",
    .tp_basicsize = sizeof(RequestFields),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One client connection's request fields (gateway.http.fields.RequestFieldsPy).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)rf_init,
    .tp_dealloc = (destructor)rf_dealloc,
    .tp_traverse = (traverseproc)rf_traverse,
    .tp_clear = (inquiry)rf_clear,
    .tp_methods = rf_methods,
    .tp_members = rf_members,
    .tp_getset = rf_getset,
};

/* -- scan_fields: an upstream response's field lines ------------------------------------- */

#define HAS_DATE 1
#define HAS_REQUEST_ID 2
#define ODD 4
#define CHUNKED 8

enum kind { PLAIN, DATE, REQUEST_ID, CONTENT_LENGTH, CONNECTION, TRANSFER_ENCODING, ODD_FIELD };

/* Whether s[0:n] equals the lower-case literal lit, ignoring ASCII case. */
static int
name_is(const char *s, Py_ssize_t n, const char *lit)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 'A' && c <= 'Z')
            c += 'a' - 'A';
        if (lit[i] == '\0' || c != (unsigned char)lit[i])
            return 0;
    }
    return lit[n] == '\0';
}

/* What a response field is to the proxy (fields.py: _RESPONSE_KINDS). */
static const struct {
    const char *name;
    Py_ssize_t len;
    enum kind kind;
} KINDS[] = {
    {"content-length", 14, CONTENT_LENGTH},
    {"transfer-encoding", 17, TRANSFER_ENCODING},
    {"connection", 10, CONNECTION},
    {"date", 4, DATE},
    {"x-request-id", 12, REQUEST_ID},
    {"keep-alive", 10, ODD_FIELD},
    {"proxy-connection", 16, ODD_FIELD},
    {"proxy-authenticate", 18, ODD_FIELD},
    {"proxy-authorization", 19, ODD_FIELD},
    {"te", 2, ODD_FIELD},
    {"trailer", 7, ODD_FIELD},
    {"upgrade", 7, ODD_FIELD},
    {"via", 3, ODD_FIELD},
    {"strict-transport-security", 25, ODD_FIELD},
};

static enum kind
kind_of(const char *s, Py_ssize_t n)
{
    size_t k;
    for (k = 0; k < sizeof(KINDS) / sizeof(KINDS[0]); k++) {
        if (KINDS[k].len == n && name_is(s, n, KINDS[k].name))
            return KINDS[k].kind;
    }
    return PLAIN;
}

/* Whether the value ends with "chunked" (ASCII case ignored), trailing blanks dropped. */
static int
ends_chunked(const char *v, Py_ssize_t n)
{
    while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t'))
        n--;
    return n >= 7 && name_is(v + n - 7, 7, "chunked");
}

static PyObject *
scan_fields(PyObject *Py_UNUSED(module), PyObject *arg)
{
    const char *p, *line, *colon, *cr, *v;
    Py_ssize_t n, pos, end, next, len, vlen, olen = 0;
    PyObject *plain = NULL, *length = NULL, *connection = NULL, *value, *joined, *result;
    char *out = NULL;
    int flags = 0, cut = 0;
    enum kind kind;

    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "scan_fields() takes bytes");
        return NULL;
    }
    p = PyBytes_AS_STRING(arg);
    n = PyBytes_GET_SIZE(arg);
    if (n > 0 && (n < 2 || p[n - 2] != '\r' || p[n - 1] != '\n')) {
        PyErr_SetString(PyExc_ValueError, "field lines must end with CRLF");
        return NULL;
    }
    for (pos = 0; pos < n; pos = next) {
        line = p + pos;
        /* the line ends at the next CRLF (or at the end: a last line without one) */
        end = pos;
        for (;;) {
            cr = memchr(p + end, '\r', (size_t)(n - end));
            if (cr == NULL) {
                end = n;
                next = n;
                break;
            }
            end = cr - p;
            if (end + 1 < n && p[end + 1] == '\n') {
                next = end + 2;
                break;
            }
            end++;
        }
        len = end - pos;
        colon = memchr(line, ':', (size_t)len);
        kind = colon == NULL ? PLAIN : kind_of(line, colon - line);
        if (kind == PLAIN || kind == DATE || kind == REQUEST_ID) {
            if (kind == DATE)
                flags |= HAS_DATE;
            else if (kind == REQUEST_ID)
                flags |= HAS_REQUEST_ID;
            if (cut) {
                memcpy(out + olen, line, (size_t)(next - pos));
                olen += next - pos;
            }
            continue;
        }
        if (!cut) {
            /* the first line left out: copy what came before it, and go on copying */
            cut = 1;
            plain = PyBytes_FromStringAndSize(NULL, n);
            if (plain == NULL)
                goto error;
            out = PyBytes_AS_STRING(plain);
            memcpy(out, p, (size_t)pos);
            olen = pos;
        }
        if (kind == ODD_FIELD) {
            flags |= ODD;
            continue;
        }
        v = colon + 1;
        while (v < p + end && (*v == ' ' || *v == '\t'))
            v++;
        vlen = (p + end) - v;
        if (kind == TRANSFER_ENCODING) {  /* llhttp frames by the last coding */
            if (ends_chunked(v, vlen))
                flags |= CHUNKED;
            else
                flags &= ~CHUNKED;
            continue;
        }
        value = PyBytes_FromStringAndSize(v, vlen);
        if (value == NULL)
            goto error;
        if (kind == CONTENT_LENGTH) {
            Py_XSETREF(length, value);
        }
        else if (connection == NULL) {
            connection = value;
        }
        else {  /* several Connection fields: one list */
            joined = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(connection) + 2 + vlen);
            if (joined == NULL) {
                Py_DECREF(value);
                goto error;
            }
            memcpy(PyBytes_AS_STRING(joined), PyBytes_AS_STRING(connection),
                   (size_t)PyBytes_GET_SIZE(connection));
            memcpy(PyBytes_AS_STRING(joined) + PyBytes_GET_SIZE(connection), ", ", 2);
            memcpy(PyBytes_AS_STRING(joined) + PyBytes_GET_SIZE(connection) + 2, v, (size_t)vlen);
            Py_DECREF(value);
            Py_SETREF(connection, joined);
        }
    }
    if (cut) {
        if (_PyBytes_Resize(&plain, olen) < 0)
            goto error;
    }
    else {
        plain = Py_NewRef(arg);
    }
    result = Py_BuildValue("(NOOi)", plain, length ? length : Py_None,
                           connection ? connection : Py_None, flags);
    Py_XDECREF(length);
    Py_XDECREF(connection);
    return result;

error:
    Py_XDECREF(plain);
    Py_XDECREF(length);
    Py_XDECREF(connection);
    return NULL;
}

/* -- gcra_take: a bucket's take in the shared-memory table -------------------------------- */

/* gcra_take(words, i, a, b, now, step, tolerance): the caller holds the table's lock. None
 * when the slot at i is not the key's (fingerprint a, b), or the numbers leave 64 bits;
 * otherwise the wait after an allowed take (>= 0, the new TAT written), or -1 - wait for a
 * denied one (the bucket untouched). gateway/state/shm.py: gcra_take_py. */
static PyObject *
gcra_take(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    long long v[6];
    int64_t *q, tat, wait, next;
    Py_ssize_t k, n, i;
    PyObject *result;

    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "gcra_take() takes 7 arguments");
        return NULL;
    }
    for (k = 0; k < 6; k++) {
        v[k] = PyLong_AsLongLong(args[k + 1]);
        if (v[k] == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return NULL;
            PyErr_Clear();
            Py_RETURN_NONE;  /* beyond 64 bits: the Python version's business */
        }
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (view.itemsize != 8 || view.format == NULL || strcmp(view.format, "q") != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "gcra_take() takes a memoryview cast to 'q'");
        return NULL;
    }
    n = view.len / (Py_ssize_t)sizeof(int64_t);
    i = (Py_ssize_t)v[0];
    if (v[0] < 0 || v[0] > (long long)n - 4 || ((uintptr_t)view.buf % sizeof(int64_t)) != 0) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    q = (int64_t *)view.buf;
    if (q[i] != v[1] || q[i + 1] != v[2]) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;  /* not the key's slot (any more): the caller looks it up */
    }
    tat = q[i + 3];
    if (tat < v[3])
        tat = v[3];
    if (__builtin_add_overflow(tat, (int64_t)v[4], &wait)
        || __builtin_sub_overflow(wait, (int64_t)v[3], &wait)) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    if (wait <= v[5]) {
        next = (int64_t)v[3] + wait;  /* = tat + step: no overflow, checked above */
        q[i + 3] = next;
        result = PyLong_FromLongLong(wait);
    }
    else {
        if (__builtin_sub_overflow(tat, (int64_t)v[3], &wait)) {
            PyBuffer_Release(&view);
            Py_RETURN_NONE;
        }
        result = PyLong_FromLongLong(-1 - wait);
    }
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_fields", scan_fields, METH_O,
     "scan_fields(fields) -> (plain, content_length, connection, flags)\n\n"
     "What the proxy needs of an upstream response's raw field lines."},
    {"gcra_take", (PyCFunction)(void (*)(void))gcra_take, METH_FASTCALL,
     "gcra_take(words, i, a, b, now, step, tolerance) -> int | None\n\n"
     "A bucket's take in the shared-memory table (gateway.state.shm.gcra_take_py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gateway._speedups", "Compiled fast paths of the data plane.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *m;

    if (PyType_Ready(&RequestFieldsType) < 0)
        return NULL;
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    if (empty_bytes == NULL)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "RequestFields", (PyObject *)&RequestFieldsType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
