/* Compiled fast paths for the data plane's per-request work, with the same behaviour as the
 * pure-Python versions they stand in for (gateway/http/fields.py, gateway/state/shm.py,
 * gateway/proxy/forward.py, gateway/http/trace.py, gateway/proxy/exchange.py).
 * Built when a C compiler is present (setup.py: an optional extension); the gateway runs the
 * Python versions otherwise. tests/unit/test_speedups.py and test_speedups_heads.py check
 * the two agree.
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
    value = PyLong_FromLong(flags);
    result = value == NULL ? NULL : PyTuple_New(4);
    if (result == NULL) {
        Py_XDECREF(value);
        goto error;
    }
    PyTuple_SET_ITEM(result, 0, plain);
    PyTuple_SET_ITEM(result, 1, length ? length : Py_NewRef(Py_None));
    PyTuple_SET_ITEM(result, 2, connection ? connection : Py_NewRef(Py_None));
    PyTuple_SET_ITEM(result, 3, value);
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

/* -- TraceChild: the traceparent sent upstream --------------------------------------------- */

/* TraceChild(hex_block, random)(incoming, sample_ratio) -> (trace_id, traceparent): the
 * reference version is gateway/http/trace.py's child_py. Random hex digits come in blocks
 * from hex_block() (48 a request: 32 of trace id, 16 of span id); random() draws the
 * sampling decision of a new trace when the ratio is below 1. */

typedef struct {
    PyObject_HEAD
    PyObject *hex_block, *random;
    PyObject *buf;          /* bytes of hex digits, or NULL */
    Py_ssize_t pos;
} TraceChild;

#define TRACE_VALUE_LEN 55  /* 00-<32 hex>-<16 hex>-<2 hex> */

/* made at module init (heads_module_init) */
static PyObject *s_strip, *s_join, *s_decode, *float_one, *int_100, *int_600, *b_comma_space;

static int
is_lower_hex(const char *s, Py_ssize_t n)
{
    Py_ssize_t i;

    for (i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static int
all_zeros(const char *s, Py_ssize_t n)
{
    Py_ssize_t i;

    for (i = 0; i < n; i++)
        if (s[i] != '0')
            return 0;
    return 1;
}

/* trace.parse: the incoming value's trace id and flags (pointers into s), or 0 */
static int
trace_parse(const char *s, Py_ssize_t n, int strip, const char **trace_id, const char **flags)
{
    /* bytes.strip(): ASCII whitespace at both ends */
    while (strip && n > 0 && Py_ISSPACE(*s)) {
        s++;
        n--;
    }
    while (strip && n > 0 && Py_ISSPACE(s[n - 1]))
        n--;
    if (n < TRACE_VALUE_LEN || s[2] != '-' || s[35] != '-' || s[52] != '-'
        || !is_lower_hex(s, 2) || !is_lower_hex(s + 3, 32) || !is_lower_hex(s + 36, 16)
        || !is_lower_hex(s + 53, 2))
        return 0;
    if (n > TRACE_VALUE_LEN) {  /* (-.*)?: a dash, then anything but a line feed */
        if (s[TRACE_VALUE_LEN] != '-'
            || memchr(s + TRACE_VALUE_LEN + 1, '\n', (size_t)(n - TRACE_VALUE_LEN - 1)) != NULL)
            return 0;
        if (s[0] == '0' && s[1] == '0')
            return 0;  /* version 00 has nothing after the flags */
    }
    if ((s[0] == 'f' && s[1] == 'f') || all_zeros(s + 3, 32) || all_zeros(s + 36, 16))
        return 0;
    *trace_id = s + 3;
    *flags = s + 53;
    return 1;
}

/* The traceparent value for incoming (None or bytes-like) into out; 0, or -1 with an
 * exception. child_py's steps in its order: parse(incoming) (value.strip(), then the
 * pattern), the 48 digits, then sample_ratio >= 1.0 or random() < sample_ratio. */
static int
trace_make(TraceChild *self, PyObject *incoming, PyObject *ratio, char *out)
{
    Py_buffer view;
    const char *trace_id = NULL, *flags = NULL;
    char ids[48];  /* a copy: Python code below (__float__, __lt__, random()) can call this
                    * TraceChild again, which may refill and free self->buf */
    PyObject *block, *drawn, *stripped = NULL;
    int parsed = 0, sampled = 0, r;

    if (self->hex_block == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "TraceChild.__init__ was not called");
        return -1;
    }
    if (incoming != Py_None) {
        if (!PyBytes_CheckExact(incoming) && !PyByteArray_CheckExact(incoming)) {
            /* value.strip() (an AttributeError without one); the pattern takes a bytes-like
             * result and refuses a str */
            stripped = PyObject_CallMethodNoArgs(incoming, s_strip);
            if (stripped == NULL)
                return -1;
            if (PyUnicode_Check(stripped)) {
                Py_DECREF(stripped);
                PyErr_SetString(PyExc_TypeError,
                                "cannot use a bytes pattern on a string-like object");
                return -1;
            }
        }
        r = PyObject_GetBuffer(stripped ? stripped : incoming, &view, PyBUF_SIMPLE);
        if (r == 0) {
            parsed = trace_parse(view.buf, view.len, stripped == NULL, &trace_id, &flags);
            if (parsed) {
                memcpy(out + 3, trace_id, 32);
                /* only the sampled bit is defined for version 00; others are not ours */
                sampled = strchr("13579bdf", flags[1]) != NULL;
            }
            PyBuffer_Release(&view);
        }
        Py_XDECREF(stripped);
        if (r < 0)
            return -1;
    }
    if (self->buf == NULL || self->pos + 48 > PyBytes_GET_SIZE(self->buf)) {
        block = PyObject_CallNoArgs(self->hex_block);
        if (block == NULL)
            return -1;
        if (!PyBytes_Check(block) || PyBytes_GET_SIZE(block) < 48) {
            Py_DECREF(block);
            PyErr_SetString(PyExc_ValueError, "hex_block() must return at least 48 bytes");
            return -1;
        }
        Py_XSETREF(self->buf, block);
        self->pos = 0;
    }
    memcpy(ids, PyBytes_AS_STRING(self->buf) + self->pos, 48);
    self->pos += 48;
    memcpy(out, "00-", 3);
    memcpy(out + 35, "-", 1);
    memcpy(out + 36, ids + 32, 16);
    memcpy(out + 52, "-", 1);
    if (!parsed) {
        memcpy(out + 3, ids, 32);
        if (PyFloat_CheckExact(ratio))
            sampled = PyFloat_AS_DOUBLE(ratio) >= 1.0;
        else if ((sampled = PyObject_RichCompareBool(ratio, float_one, Py_GE)) < 0)
            return -1;
        if (!sampled) {
            drawn = PyObject_CallNoArgs(self->random);
            if (drawn == NULL)
                return -1;
            if (PyFloat_CheckExact(drawn) && PyFloat_CheckExact(ratio))
                sampled = PyFloat_AS_DOUBLE(drawn) < PyFloat_AS_DOUBLE(ratio);
            else
                sampled = PyObject_RichCompareBool(drawn, ratio, Py_LT);
            Py_DECREF(drawn);
            if (sampled < 0)
                return -1;
        }
    }
    memcpy(out + 53, sampled ? "01" : "00", 2);
    return 0;
}

static PyObject *
trace_child_call(TraceChild *self, PyObject *args, PyObject *kwds)
{
    PyObject *incoming, *ratio, *trace_id, *value, *result;
    char out[TRACE_VALUE_LEN];
    static char *kwlist[] = {"incoming", "sample_ratio", NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:child", kwlist, &incoming, &ratio))
        return NULL;
    if (trace_make(self, incoming, ratio, out) < 0)
        return NULL;
    trace_id = PyBytes_FromStringAndSize(out + 3, 32);
    value = trace_id == NULL ? NULL : PyBytes_FromStringAndSize(out, TRACE_VALUE_LEN);
    result = value == NULL ? NULL : PyTuple_Pack(2, trace_id, value);
    Py_XDECREF(trace_id);
    Py_XDECREF(value);
    return result;
}

static int
trace_child_init(TraceChild *self, PyObject *args, PyObject *kwds)
{
    PyObject *hex_block, *random;
    static char *kwlist[] = {"hex_block", "random", NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:TraceChild", kwlist, &hex_block, &random))
        return -1;
    if (self->hex_block != NULL) {
        PyErr_SetString(PyExc_TypeError, "TraceChild.__init__ may be called once");
        return -1;
    }
    Py_XSETREF(self->hex_block, Py_NewRef(hex_block));
    Py_XSETREF(self->random, Py_NewRef(random));
    Py_CLEAR(self->buf);
    self->pos = 0;
    return 0;
}

static int
trace_child_traverse(TraceChild *self, visitproc visit, void *arg)
{
    Py_VISIT(self->hex_block);
    Py_VISIT(self->random);
    return 0;
}

static int
trace_child_clear(TraceChild *self)
{
    Py_CLEAR(self->hex_block);
    Py_CLEAR(self->random);
    Py_CLEAR(self->buf);
    return 0;
}

static void
trace_child_dealloc(TraceChild *self)
{
    PyObject_GC_UnTrack(self);
    trace_child_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject TraceChildType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._speedups.TraceChild",
    .tp_doc = "TraceChild(hex_block, random)\n\n"
              "Called as (incoming, sample_ratio) -> (trace_id, traceparent): "
              "gateway.http.trace.child_py, compiled.",
    .tp_basicsize = sizeof(TraceChild),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)trace_child_init,
    .tp_call = (ternaryfunc)trace_child_call,
    .tp_dealloc = (destructor)trace_child_dealloc,
    .tp_traverse = (traverseproc)trace_child_traverse,
    .tp_clear = (inquiry)trace_child_clear,
};


/* -- Heads: the request head sent upstream, the response head sent back -------------------- */

/* The reference versions are gateway/proxy/forward.py's request_head_py and
 * response_head_py: these read the same attributes, in the same order where it can be seen
 * (a getter with side effects: FieldLines.items), and write the same bytes. A Heads holds
 * the module constants they use, given once by forward.py. */

typedef struct {
    PyObject_HEAD
    PyObject *status_lines_10, *status_lines_11;   /* tuples, indexed by status */
    PyObject *status_line;                         /* status_line(status, http10) */
    PyObject *plain_connection;                    /* Connection values naming nothing */
    PyObject *connection_tokens;                   /* connection_tokens(value) -> list */
    PyObject *response_skip, *response_skip_hsts;  /* sets of lower-case names */
    PyObject *trace_child;                         /* trace.child(incoming, ratio) */
    PyObject *body_chunked;                        /* Exchange.body_kind of a chunked body */
    long has_date, has_request_id;                 /* UpstreamConnection.field_flags bits */
} Heads;

#define HEADS_OBJECTS(X) \
    X(status_lines_10) X(status_lines_11) X(status_line) X(plain_connection) \
    X(connection_tokens) X(response_skip) X(response_skip_hsts) X(trace_child) X(body_chunked)

/* Interned attribute names, made at module init. */
#define HEAD_NAMES(X) \
    X(method) X(query) X(url) X(headers) X(items) X(route) X(preserve_host) X(host) \
    X(host_header) X(conn) X(peer_ip_bytes) X(scheme) X(via) X(body_kind) X(length_header) \
    X(request_id_raw) X(request_id) X(trace) X(traceparent) X(sample_ratio) X(trace_id) \
    X(tls_client) X(header_block) X(request_skip) X(status) X(http10) X(hsts) \
    X(response_headers) X(request_id_header) X(plain) X(field_flags) X(keep_alive)

/* An attribute read, cached as the interpreter's LOAD_ATTR_SLOT caches it: for a type whose
 * attribute is a __slots__ member (and which reads attributes the default way), the value's
 * offset in the object, valid while the type's version tag is the one seen. A type changed
 * since gets a new tag (0 until then), and the read takes the generic path again. */
typedef struct {
    PyTypeObject *type;     /* not a reference: only compared, while the tag matches */
    unsigned int version;   /* 0: nothing cached */
    Py_ssize_t offset;
} SlotCache;

#define NAME_DECL(name) \
    static PyObject *str_##name; static SlotCache cache_##name __attribute__((unused));
HEAD_NAMES(NAME_DECL)
#undef NAME_DECL

/* obj.<name> (a new reference), through the cache */
static PyObject *
slot_get(PyObject *obj, PyObject *name, SlotCache *cache)
{
    PyTypeObject *tp = Py_TYPE(obj);
    PyObject *descr, *value;
    PyMemberDef *member;

    if (tp == cache->type && cache->version != 0 && tp->tp_version_tag == cache->version) {
        value = *(PyObject **)((char *)obj + cache->offset);
        if (value != NULL)
            return Py_NewRef(value);
        return PyObject_GetAttr(obj, name);  /* unset: its AttributeError */
    }
    if (tp->tp_getattro == PyObject_GenericGetAttr) {
        descr = _PyType_Lookup(tp, name);  /* borrowed; gives the type a version tag */
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)
            && PyType_IsSubtype(tp, PyDescr_TYPE(descr))) {  /* else member_get's TypeError */
            member = ((PyMemberDescrObject *)descr)->d_member;
            if (member->type == T_OBJECT_EX && !(member->flags & PY_AUDIT_READ)
                && tp->tp_version_tag != 0) {
                cache->type = tp;
                cache->version = tp->tp_version_tag;
                cache->offset = member->offset;
            }
        }
    }
    return PyObject_GetAttr(obj, name);
}

/* The names request_head_py and response_head_py compare with (bytes, made at init). */
#define HEAD_FIELD_NAMES(X) \
    X(xff, "x-forwarded-for") X(xfp, "x-forwarded-proto") X(xfh, "x-forwarded-host") \
    X(via, "via") X(traceparent, "traceparent") X(date, "date")
#define FIELD_DECL(name, text) static PyObject *n_##name;
HEAD_FIELD_NAMES(FIELD_DECL)
#undef FIELD_DECL

/* lname == name, as Python compares them: an exact bytes here, anything else by its own
 * __eq__. 1, 0, or -1 with an exception. */
static int
lname_is(PyObject *o, PyObject *name)
{
    if (PyBytes_CheckExact(o))
        return PyBytes_GET_SIZE(o) == PyBytes_GET_SIZE(name)
               && memcmp(PyBytes_AS_STRING(o), PyBytes_AS_STRING(name),
                         (size_t)PyBytes_GET_SIZE(o)) == 0;
    return PyObject_RichCompareBool(o, name, Py_EQ);
}

/* a + b", " + b with Python's +, eager, as the Python versions join Via values */
static PyObject *
concat_comma(PyObject *a, PyObject *b)
{
    PyObject *ab, *out;

    ab = PyNumber_Add(a, b_comma_space);
    if (ab == NULL)
        return NULL;
    out = PyNumber_Add(ab, b);
    Py_DECREF(ab);
    return out;
}

/* A head being written: its bytes copied in as they come, on the stack while they fit. */
typedef struct {
    char *buf;
    Py_ssize_t len, cap;
    PyObject *bad;  /* the type of the first piece b"".join would refuse (a reference), or NULL */
    char local[2048];
} Parts;

static void
parts_init(Parts *p)
{
    p->buf = p->local;
    p->len = 0;
    p->cap = (Py_ssize_t)sizeof(p->local);
    p->bad = NULL;
}

static void
parts_free(Parts *p)
{
    if (p->buf != p->local)
        PyMem_Free(p->buf);
    p->buf = p->local;
    p->len = 0;
    Py_CLEAR(p->bad);
}

static int
parts_grow(Parts *p, Py_ssize_t n)
{
    char *grown;
    Py_ssize_t cap = p->cap;

    if (n > PY_SSIZE_T_MAX / 2 - p->len) {
        PyErr_NoMemory();
        return -1;
    }
    while (n > cap - p->len)
        cap *= 2;
    grown = PyMem_Malloc((size_t)cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(grown, p->buf, (size_t)p->len);
    if (p->buf != p->local)
        PyMem_Free(p->buf);
    p->buf = grown;
    p->cap = cap;
    return 0;
}

static inline int
parts_put(Parts *p, const char *s, Py_ssize_t n)
{
    if (n > p->cap - p->len && parts_grow(p, n) < 0)
        return -1;
    memcpy(p->buf + p->len, s, (size_t)n);
    p->len += n;
    return 0;
}

/* a string literal */
#define PARTS_LITERAL(p, text) parts_put(p, text, (Py_ssize_t)sizeof(text) - 1)

/* Append o: bytes, or another bytes-like object (as b"".join takes them); anything else is
 * b"".join's TypeError, raised by parts_join: the Python versions join last, after every
 * attribute read and ex.trace_id/ex.traceparent set. */
static int
parts_add(Parts *p, PyObject *o)
{
    Py_buffer view;
    int r;

    if (PyBytes_Check(o))
        return parts_put(p, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o));
    if (!PyObject_CheckBuffer(o)) {
        if (p->bad == NULL)
            p->bad = Py_NewRef((PyObject *)Py_TYPE(o));
        return 0;
    }
    if (PyObject_GetBuffer(o, &view, PyBUF_SIMPLE) < 0)
        return -1;
    r = parts_put(p, view.buf, view.len);
    PyBuffer_Release(&view);
    return r;
}

/* Append a field line: name, ": ", value, CRLF. */
static int
parts_line(Parts *p, PyObject *name, PyObject *value)
{
    return (parts_add(p, name) < 0 || PARTS_LITERAL(p, ": ") < 0 || parts_add(p, value) < 0
            || PARTS_LITERAL(p, "\r\n") < 0) ? -1 : 0;
}

/* The bytes written; the buffer is released either way. */
static PyObject *
parts_join(Parts *p)
{
    PyObject *out = NULL;

    if (p->bad != NULL)
        PyErr_Format(PyExc_TypeError, "sequence item: expected a bytes-like object, %.80s found",
                     ((PyTypeObject *)p->bad)->tp_name);
    else
        out = PyBytes_FromStringAndSize(p->buf, p->len);

    parts_free(p);
    return out;
}

/* A header triple's three items (borrowed, valid while the tuple is held): the tuple given
 * back, a new reference, for the caller to release. */
static PyObject *
unpack_triple(PyObject *item, PyObject **lname, PyObject **raw, PyObject **value)
{
    PyObject *t;

    if (PyTuple_CheckExact(item))
        t = Py_NewRef(item);
    else {  /* item is borrowed from the list, and its __iter__ may take it out of it */
        Py_INCREF(item);
        t = PySequence_Tuple(item);
        Py_DECREF(item);
    }
    if (t == NULL)
        return NULL;
    if (PyTuple_GET_SIZE(t) != 3) {
        PyErr_Format(PyExc_ValueError, "a header is 3 items (name, raw name, value), not %zd",
                     PyTuple_GET_SIZE(t));
        Py_DECREF(t);
        return NULL;
    }
    *lname = PyTuple_GET_ITEM(t, 0);
    *raw = PyTuple_GET_ITEM(t, 1);
    *value = PyTuple_GET_ITEM(t, 2);
    return t;
}

/* the headers' items list (a new reference) */
static PyObject *
header_items(PyObject *headers_owner, PyObject *attr)
{
    PyObject *headers, *items;

    headers = slot_get(headers_owner, attr, attr == str_headers ? &cache_headers
                                                                : &cache_response_headers);
    if (headers == NULL)
        return NULL;
    items = slot_get(headers, str_items, &cache_items);
    Py_DECREF(headers);
    if (items != NULL && !PyList_Check(items)) {
        Py_SETREF(items, PySequence_List(items));
    }
    return items;
}

/* request_head(ex, target, path, trusted_peer, fwd) -> bytes: request_head_py */
static PyObject *
heads_request_head(Heads *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *ex, *target, *path, *fwd;
    PyObject *items = NULL, *xff = NULL, *xfp = NULL, *xfh = NULL, *via = NULL, *incoming = NULL;
    PyObject *o = NULL, *o2 = NULL, *conn = NULL, *host = NULL, *t, *lname, *raw, *value;
    PyObject *skip = NULL, *child = NULL, *decoded, *tid;
    char trace_out[TRACE_VALUE_LEN];
    Parts p;
    Py_ssize_t i;
    int trusted, r;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "request_head() takes 5 arguments");
        return NULL;
    }
    ex = args[0];
    target = args[1];
    path = args[2];
    fwd = args[4];
    trusted = PyObject_IsTrue(args[3]);
    if (trusted < 0)
        return NULL;
    parts_init(&p);

#define GET(dst, obj, name) do { Py_XSETREF(dst, slot_get(obj, str_##name, &cache_##name)); \
        if ((dst) == NULL) goto error; } while (0)
#define ADD(obj) do { if (parts_add(&p, obj) < 0) goto error; } while (0)
#define PUT(text) do { if (PARTS_LITERAL(&p, text) < 0) goto error; } while (0)
#define TRUTH(dst, obj) do { dst = PyObject_IsTrue(obj); if ((dst) < 0) goto error; } while (0)

    GET(o, ex, method);
    ADD(o);
    PUT(" ");
    ADD(path);
    GET(o, ex, query);
    TRUTH(r, o);
    if (r) {
        PUT("?");
        ADD(o);
    }
    else {
        GET(o, ex, url);
        if (PyBytes_CheckExact(o))
            r = memchr(PyBytes_AS_STRING(o), '?', (size_t)PyBytes_GET_SIZE(o)) != NULL;
        else {
            o2 = PyLong_FromLong('?');
            if (o2 == NULL)
                goto error;
            r = PySequence_Contains(o, o2);
            Py_CLEAR(o2);
            if (r < 0)
                goto error;
        }
        if (r)
            PUT("?");
    }
    PUT(" HTTP/1.1\r\n");

    xfp = Py_NewRef(empty_bytes);
    xfh = Py_NewRef(empty_bytes);
    via = Py_NewRef(empty_bytes);
    incoming = Py_NewRef(Py_None);
    GET(skip, fwd, request_skip);
    items = header_items(ex, str_headers);
    if (items == NULL)
        goto error;
    for (i = 0; i < PyList_GET_SIZE(items); i++) {
        t = unpack_triple(PyList_GET_ITEM(items, i), &lname, &raw, &value);
        if (t == NULL)
            goto error;
        r = PySequence_Contains(skip, lname);  /* `in`: a set's own, with its retry for a set */
        if (r < 0) {
            Py_DECREF(t);
            goto error;
        }
        if (r) {  /* the if/elif chain's comparisons, in order, each able to fail */
            if ((r = lname_is(lname, n_xff)) > 0) {  /* the list made on the first one */
                if (xff == NULL && (xff = PyList_New(0)) == NULL)
                    r = -1;
                else
                    r = PyList_Append(xff, value);
            }
            else if (r == 0 && (r = lname_is(lname, n_xfp)) > 0)
                Py_SETREF(xfp, Py_NewRef(value));
            else if (r == 0 && (r = lname_is(lname, n_xfh)) > 0)
                Py_SETREF(xfh, Py_NewRef(value));
            else if (r == 0 && (r = lname_is(lname, n_via)) > 0) {
                r = PyObject_IsTrue(via);
                if (r == 0)
                    Py_SETREF(via, Py_NewRef(value));
                else if (r > 0) {
                    PyObject *joined = concat_comma(via, value);
                    if (joined == NULL)
                        r = -1;
                    else
                        Py_SETREF(via, joined);
                }
            }
            else if (r == 0 && (r = lname_is(lname, n_traceparent)) > 0)
                Py_SETREF(incoming, Py_NewRef(value));
            Py_DECREF(t);
            if (r < 0)
                goto error;
            continue;
        }
        r = parts_line(&p, raw, value);
        Py_DECREF(t);
        if (r < 0)
            goto error;
    }

    /* host = ex.host if (route is not None and route.preserve_host and ex.host) else
     * target.host_header */
    GET(o, ex, route);
    r = 0;
    if (o != Py_None) {
        GET(o2, o, preserve_host);
        TRUTH(r, o2);
        if (r) {
            GET(host, ex, host);
            TRUTH(r, host);
        }
    }
    if (!r)
        GET(host, target, host_header);
    GET(conn, ex, conn);
    GET(o, conn, peer_ip_bytes);
    PUT("x-forwarded-for: ");
    if (trusted && xff != NULL) {  /* b", ".join(xff): eager, as in Python */
        o2 = PyObject_CallMethodOneArg(b_comma_space, s_join, xff);
        if (o2 == NULL)
            goto error;
        ADD(o2);
        Py_CLEAR(o2);
        PUT(", ");
    }
    ADD(o);
    PUT("\r\n");
    PUT("x-forwarded-proto: ");
    r = 0;
    if (trusted)  /* Python's `and` */
        TRUTH(r, xfp);
    if (r)
        ADD(xfp);
    else {
        GET(o, conn, scheme);
        ADD(o);
    }
    PUT("\r\n");
    r = 0;
    if (trusted)
        TRUTH(r, xfh);
    if (r)
        Py_XSETREF(o, Py_NewRef(xfh));
    else
        GET(o, ex, host);
    TRUTH(r, o);
    if (r) {  /* an HTTP/1.0 request may carry no Host at all */
        PUT("x-forwarded-host: ");
        ADD(o);
        PUT("\r\n");
    }
    GET(o, fwd, via);
    TRUTH(r, o);
    if (r) {
        PUT("via: ");
        TRUTH(r, via);
        if (r) {  /* via + b", " + fwd.via: eager, as in Python */
            Py_SETREF(o, concat_comma(via, o));
            if (o == NULL)
                goto error;
        }
        ADD(o);
        PUT("\r\n");
    }
    GET(o, ex, body_kind);
    r = PyObject_RichCompareBool(o, self->body_chunked, Py_EQ);
    if (r < 0)
        goto error;
    if (r)
        PUT("transfer-encoding: chunked\r\n");
    else {
        GET(o, ex, length_header);
        if (o != Py_None) {
            PUT("content-length: ");
            ADD(o);
            PUT("\r\n");
        }
    }
    GET(o, fwd, request_id_raw);
    ADD(o);
    PUT(": ");
    GET(o, ex, request_id);
    Py_SETREF(o, PyUnicode_CheckExact(o) ? PyUnicode_AsLatin1String(o)
                                         : PyObject_CallMethod(o, "encode", "s", "latin-1"));
    if (o == NULL)
        goto error;
    ADD(o);
    PUT("\r\n");
    GET(o, fwd, trace);
    TRUTH(r, o);
    if (r) {
        GET(o, ex, traceparent);
        if (o == Py_None) {  /* a retry keeps the first attempt's */
            GET(o2, fwd, sample_ratio);
            if (Py_IS_TYPE(self->trace_child, &TraceChildType)) {  /* trace.child compiled */
                r = trace_make((TraceChild *)self->trace_child, incoming, o2, trace_out);
                Py_CLEAR(o2);
                if (r < 0)
                    goto error;
                decoded = PyUnicode_DecodeASCII(trace_out + 3, 32, NULL);
                Py_SETREF(o, PyBytes_FromStringAndSize(trace_out, TRACE_VALUE_LEN));
            }
            else {
                child = PyObject_CallFunctionObjArgs(self->trace_child, incoming, o2, NULL);
                Py_CLEAR(o2);
                if (child == NULL)
                    goto error;
                if (!PyTuple_CheckExact(child) || PyTuple_GET_SIZE(child) != 2) {
                    /* unpacked as Python unpacks: any iterable of exactly two */
                    Py_SETREF(child, PySequence_Tuple(child));
                    if (child == NULL)
                        goto error;
                    if (PyTuple_GET_SIZE(child) != 2) {
                        PyErr_Format(PyExc_ValueError, "%s values to unpack (expected 2, got %zd)",
                                     PyTuple_GET_SIZE(child) < 2 ? "not enough" : "too many",
                                     PyTuple_GET_SIZE(child));
                        goto error;
                    }
                }
                tid = PyTuple_GET_ITEM(child, 0);
                decoded = PyBytes_CheckExact(tid)
                    ? PyUnicode_DecodeUTF8(PyBytes_AS_STRING(tid), PyBytes_GET_SIZE(tid), NULL)
                    : PyObject_CallMethodNoArgs(tid, s_decode);
                Py_SETREF(o, Py_NewRef(PyTuple_GET_ITEM(child, 1)));
            }
            if (decoded == NULL || o == NULL) {
                Py_XDECREF(decoded);
                goto error;
            }
            r = PyObject_SetAttr(ex, str_trace_id, decoded);
            Py_DECREF(decoded);
            if (r < 0 || PyObject_SetAttr(ex, str_traceparent, o) < 0)
                goto error;
        }
        PUT("traceparent: ");
        ADD(o);
        PUT("\r\n");
    }
    GET(o, conn, tls_client);
    if (o != Py_None) {
        GET(o, o, header_block);
        ADD(o);
    }
    PUT("host: ");
    ADD(host);
    PUT("\r\n\r\n");
    Py_CLEAR(o);  /* conn.tls_client or its header_block */
    o = parts_join(&p);
    goto done;

error:
    parts_free(&p);
    Py_CLEAR(o);
done:
    Py_XDECREF(o2);
    Py_XDECREF(items);
    Py_XDECREF(xff);
    Py_XDECREF(xfp);
    Py_XDECREF(xfh);
    Py_XDECREF(via);
    Py_XDECREF(incoming);
    Py_XDECREF(conn);
    Py_XDECREF(host);
    Py_XDECREF(skip);
    Py_XDECREF(child);
    return o;
}

/* response_head(ex, content_length, chunked, fwd, date, connection=None, extra=b"",
 * upstream=None) -> bytes: response_head_py */
static PyObject *
heads_response_head(Heads *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"ex", "content_length", "chunked", "fwd", "date",
                                        "connection", "extra", "upstream"};
    PyObject *a[8] = {NULL, NULL, NULL, NULL, NULL, Py_None, empty_bytes, Py_None};
    PyObject *ex, *fwd, *connection, *upstream, *kw;
    PyObject *o = NULL, *o2 = NULL, *tokens = NULL, *hsts = NULL, *via = NULL, *items = NULL;
    PyObject *skip, *t, *lname, *raw, *value;
    Parts p;
    Py_ssize_t i, k, nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    long status = 0, flags;
    int r, has_date = 0, has_rid = 0, overflow = 0, generic, in_range;

    if (nargs > 8) {
        PyErr_SetString(PyExc_TypeError, "response_head() takes at most 8 arguments");
        return NULL;
    }
    for (i = 0; i < nargs; i++)
        a[i] = args[i];
    for (i = 0; i < nkw; i++) {
        kw = PyTuple_GET_ITEM(kwnames, i);
        for (k = 0; k < 8; k++)
            if (PyUnicode_CompareWithASCIIString(kw, names[k]) == 0)
                break;
        if (k == 8 || k < nargs) {
            PyErr_Format(PyExc_TypeError, "response_head() got an unexpected or repeated "
                         "argument '%U'", kw);
            return NULL;
        }
        a[k] = args[nargs + i];
    }
    for (i = 0; i < 5; i++)
        if (a[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "response_head() missing argument '%s'", names[i]);
            return NULL;
        }
    ex = a[0];
    fwd = a[3];
    connection = a[5];
    upstream = a[7];
    parts_init(&p);

    GET(o, ex, status);
    generic = !PyLong_Check(o);
    if (!generic) {
        status = PyLong_AsLongAndOverflow(o, &overflow);
        if (status == -1 && PyErr_Occurred())
            goto error;
        in_range = !overflow && status >= 100 && status < 600;
    }
    else {  /* 100 <= status < 600 with Python's comparisons (a float compares, a str raises) */
        in_range = PyObject_RichCompareBool(int_100, o, Py_LE);
        if (in_range > 0)
            in_range = PyObject_RichCompareBool(o, int_600, Py_LT);
        if (in_range < 0)
            goto error;
    }
    GET(o2, ex, http10);
    if (in_range) {
        TRUTH(r, o2);
        t = r ? self->status_lines_10 : self->status_lines_11;
        if (!generic)
            ADD(PyTuple_GET_ITEM(t, status));
        else {  /* the table's own indexing: a float index is its TypeError */
            Py_SETREF(o, PyObject_GetItem(t, o));
            if (o == NULL)
                goto error;
            ADD(o);
        }
    }
    else {
        Py_SETREF(o, PyObject_CallFunctionObjArgs(self->status_line, o, o2, NULL));
        if (o == NULL)
            goto error;
        ADD(o);
    }
    if (connection != Py_None) {
        r = PySequence_Contains(self->plain_connection, connection);
        if (r < 0)
            goto error;
        if (!r) {
            tokens = PyObject_CallOneArg(self->connection_tokens, connection);
            if (tokens == NULL)
                goto error;
        }
    }
    via = Py_NewRef(empty_bytes);
    GET(o, ex, conn);
    GET(hsts, o, hsts);
    TRUTH(r, hsts);
    if (upstream != Py_None && tokens == NULL) {
        GET(o, upstream, plain);
        ADD(o);
        GET(o, upstream, field_flags);
        flags = PyLong_AsLong(o);
        if (flags == -1 && PyErr_Occurred())
            goto error;
        has_date = (flags & self->has_date) != 0;
        has_rid = (flags & self->has_request_id) != 0;
    }
    else {
        GET(o2, fwd, request_id_header);  /* the request id's name, lower case */
        skip = r ? self->response_skip_hsts : self->response_skip;
        items = header_items(ex, str_response_headers);
        if (items == NULL)
            goto error;
        for (i = 0; i < PyList_GET_SIZE(items); i++) {
            t = unpack_triple(PyList_GET_ITEM(items, i), &lname, &raw, &value);
            if (t == NULL)
                goto error;
            r = PySequence_Contains(skip, lname);
            if (r > 0) {
                r = lname_is(lname, n_via);
                if (r > 0) {
                    r = PyObject_IsTrue(via);
                    if (r == 0)
                        Py_SETREF(via, Py_NewRef(value));
                    else if (r > 0) {  /* not into o: it holds ex.conn here */
                        PyObject *joined = concat_comma(via, value);
                        if (joined == NULL)
                            r = -1;
                        else
                            Py_SETREF(via, joined);
                    }
                }
                Py_DECREF(t);
                if (r < 0)
                    goto error;
                continue;
            }
            if (r == 0 && tokens != NULL) {
                r = PySequence_Contains(tokens, lname);
                if (r > 0) {
                    Py_DECREF(t);
                    continue;
                }
            }
            if (r == 0) {
                r = lname_is(lname, n_date);
                if (r > 0)
                    has_date = 1;
                else if (r == 0) {
                    r = PyObject_RichCompareBool(lname, o2, Py_EQ);
                    if (r > 0)
                        has_rid = 1;
                }
            }
            if (r >= 0)
                r = parts_line(&p, raw, value);
            Py_DECREF(t);
            if (r < 0)
                goto error;
        }
    }
    TRUTH(r, a[6]);
    if (r)
        ADD(a[6]);
    if (a[1] != Py_None) {
        PUT("content-length: ");
        ADD(a[1]);
        PUT("\r\n");
    }
    TRUTH(r, a[2]);
    if (r)
        PUT("transfer-encoding: chunked\r\n");
    if (!has_date)
        ADD(a[4]);
    if (!has_rid) {
        GET(o, fwd, request_id_raw);
        ADD(o);
        PUT(": ");
        GET(o, ex, request_id);
        Py_SETREF(o, PyUnicode_CheckExact(o) ? PyUnicode_AsLatin1String(o)
                                             : PyObject_CallMethod(o, "encode", "s", "latin-1"));
        if (o == NULL)
            goto error;
        ADD(o);
        PUT("\r\n");
    }
    TRUTH(r, hsts);
    if (r)
        ADD(hsts);
    GET(o, fwd, via);
    TRUTH(r, o);
    if (r) {
        PUT("via: ");
        TRUTH(r, via);
        if (r) {  /* via + b", " + fwd.via: eager, as in Python */
            Py_SETREF(o, concat_comma(via, o));
            if (o == NULL)
                goto error;
        }
        ADD(o);
        PUT("\r\n");
    }
    GET(o, ex, keep_alive);
    TRUTH(r, o);
    if (!r)
        PUT("connection: close\r\n\r\n");
    else {
        GET(o, ex, http10);
        TRUTH(r, o);
        if (r)
            PUT("connection: keep-alive\r\n\r\n");
        else
            PUT("\r\n");
    }
    Py_CLEAR(o);
    o = parts_join(&p);
    goto done;

error:
    parts_free(&p);
    Py_CLEAR(o);
done:
    Py_XDECREF(o2);
    Py_XDECREF(tokens);
    Py_XDECREF(hsts);
    Py_XDECREF(via);
    Py_XDECREF(items);
    return o;
}

#undef GET
#undef ADD
#undef PUT
#undef TRUTH

static int
heads_init(Heads *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"status_lines_10", "status_lines_11", "status_line",
                             "plain_connection", "connection_tokens", "response_skip",
                             "response_skip_hsts", "trace_child", "body_chunked", "has_date",
                             "has_request_id", NULL};
    PyObject *v[9];
    long has_date, has_rid;
    int i;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "$O!O!OO!OO!O!OOll:Heads", kwlist,
                                     &PyTuple_Type, &v[0], &PyTuple_Type, &v[1], &v[2],
                                     &PyFrozenSet_Type, &v[3], &v[4], &PyFrozenSet_Type, &v[5],
                                     &PyFrozenSet_Type, &v[6], &v[7], &v[8], &has_date, &has_rid))
        return -1;
    if (self->status_lines_10 != NULL) {  /* its fields are used borrowed, across calls out */
        PyErr_SetString(PyExc_TypeError, "Heads.__init__ may be called once");
        return -1;
    }
    if (PyTuple_GET_SIZE(v[0]) < 600 || PyTuple_GET_SIZE(v[1]) < 600) {
        PyErr_SetString(PyExc_ValueError, "a status line table has a line for each code < 600");
        return -1;
    }
    for (i = 0; i < 9; i++)
        Py_INCREF(v[i]);
    Py_XSETREF(self->status_lines_10, v[0]);
    Py_XSETREF(self->status_lines_11, v[1]);
    Py_XSETREF(self->status_line, v[2]);
    Py_XSETREF(self->plain_connection, v[3]);
    Py_XSETREF(self->connection_tokens, v[4]);
    Py_XSETREF(self->response_skip, v[5]);
    Py_XSETREF(self->response_skip_hsts, v[6]);
    Py_XSETREF(self->trace_child, v[7]);
    Py_XSETREF(self->body_chunked, v[8]);
    self->has_date = has_date;
    self->has_request_id = has_rid;
    return 0;
}

static int
heads_traverse(Heads *self, visitproc visit, void *arg)
{
#define H_VISIT(field) Py_VISIT(self->field);
    HEADS_OBJECTS(H_VISIT)
#undef H_VISIT
    return 0;
}

static int
heads_clear(Heads *self)
{
#define H_CLEAR(field) Py_CLEAR(self->field);
    HEADS_OBJECTS(H_CLEAR)
#undef H_CLEAR
    return 0;
}

static void
heads_dealloc(Heads *self)
{
    PyObject_GC_UnTrack(self);
    heads_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
heads_ready(Heads *self)
{
    if (self->status_lines_10 == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Heads.__init__ was not called");
        return -1;
    }
    return 0;
}

static PyObject *
heads_request_head_checked(Heads *self, PyObject *const *args, Py_ssize_t nargs)
{
    return heads_ready(self) < 0 ? NULL : heads_request_head(self, args, nargs);
}

static PyObject *
heads_response_head_checked(Heads *self, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    return heads_ready(self) < 0 ? NULL : heads_response_head(self, args, nargs, kwnames);
}

static PyMethodDef heads_methods[] = {
    {"request_head", (PyCFunction)(void (*)(void))heads_request_head_checked, METH_FASTCALL,
     "request_head(ex, target, path, trusted_peer, fwd) -> bytes\n\n"
     "The request head for the upstream (gateway.proxy.forward.request_head_py)."},
    {"response_head", (PyCFunction)(void (*)(void))heads_response_head_checked,
     METH_FASTCALL | METH_KEYWORDS,
     "response_head(ex, content_length, chunked, fwd, date, connection=None, extra=b'', "
     "upstream=None) -> bytes\n\n"
     "The response head for the client (gateway.proxy.forward.response_head_py)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HeadsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._speedups.Heads",
    .tp_doc = "Heads(*, status_lines_10, status_lines_11, status_line, plain_connection, "
              "connection_tokens, response_skip, response_skip_hsts, trace_child, "
              "body_chunked, has_date, has_request_id)\n\n"
              "The request and response heads, compiled, with the constants they use.",
    .tp_basicsize = sizeof(Heads),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)heads_init,
    .tp_dealloc = (destructor)heads_dealloc,
    .tp_traverse = (traverseproc)heads_traverse,
    .tp_clear = (inquiry)heads_clear,
    .tp_methods = heads_methods,
};

/* The interned names and the types; 0, or -1 with an exception. */
static int
heads_module_init(void)
{
#define NAME_INIT(name) \
    if ((str_##name = PyUnicode_InternFromString(#name)) == NULL) return -1;
    HEAD_NAMES(NAME_INIT)
#undef NAME_INIT
#define FIELD_INIT(name, text) \
    if ((n_##name = PyBytes_FromStringAndSize(text, (Py_ssize_t)sizeof(text) - 1)) == NULL) \
        return -1;
    HEAD_FIELD_NAMES(FIELD_INIT)
#undef FIELD_INIT
    if ((s_strip = PyUnicode_InternFromString("strip")) == NULL
        || (s_join = PyUnicode_InternFromString("join")) == NULL
        || (s_decode = PyUnicode_InternFromString("decode")) == NULL
        || (float_one = PyFloat_FromDouble(1.0)) == NULL
        || (int_100 = PyLong_FromLong(100)) == NULL || (int_600 = PyLong_FromLong(600)) == NULL
        || (b_comma_space = PyBytes_FromStringAndSize(", ", 2)) == NULL)
        return -1;
    return PyType_Ready(&HeadsType) < 0 || PyType_Ready(&TraceChildType) < 0 ? -1 : 0;
}

/* -- SlotDefaults: a new object's __slots__ set to their defaults in one call ---------------- */

/* SlotDefaults(cls, defaults)(obj): obj.<name> = value for each (name, value) of defaults,
 * each name a __slots__ member of cls, written at its offset; obj must be a cls. The
 * reference version is the loop of setattr in gateway/proxy/exchange.py (fill_slots_py). */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyTypeObject *cls;        /* a reference */
    PyObject *values;         /* tuple, a reference to each value */
    Py_ssize_t n;
    Py_ssize_t *offsets;      /* PyMem */
} SlotDefaults;

static int
slot_defaults_init(SlotDefaults *self, PyObject *args, PyObject *kwds)
{
    PyObject *cls, *defaults, *items = NULL, *values = NULL, *name, *descr;
    Py_ssize_t i, n, *offsets = NULL;
    PyMemberDef *member;
    static char *kwlist[] = {"cls", "defaults", NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!:SlotDefaults", kwlist, &PyType_Type,
                                     &cls, &PyDict_Type, &defaults))
        return -1;
    if (self->offsets != NULL) {
        PyErr_SetString(PyExc_TypeError, "SlotDefaults.__init__ may be called once");
        return -1;
    }
    items = PyDict_Items(defaults);
    if (items == NULL)
        return -1;
    n = PyList_GET_SIZE(items);
    values = PyTuple_New(n);
    offsets = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(Py_ssize_t));
    if (values == NULL || offsets == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    for (i = 0; i < n; i++) {
        name = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        descr = PyUnicode_Check(name) ? _PyType_Lookup((PyTypeObject *)cls, name) : NULL;
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)
            || !PyType_IsSubtype((PyTypeObject *)cls, PyDescr_TYPE(descr))
            || ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX
            || (((PyMemberDescrObject *)descr)->d_member->flags & READONLY)) {
            PyErr_Format(PyExc_ValueError, "%R is not a writable __slots__ member of %R",
                         name, cls);
            goto error;
        }
        member = ((PyMemberDescrObject *)descr)->d_member;
        offsets[i] = member->offset;
        PyTuple_SET_ITEM(values, i, Py_NewRef(PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1)));
    }
    Py_DECREF(items);
    self->cls = (PyTypeObject *)Py_NewRef(cls);
    self->values = values;
    self->n = n;
    self->offsets = offsets;
    return 0;

error:
    Py_XDECREF(items);
    Py_XDECREF(values);
    PyMem_Free(offsets);
    return -1;
}

static PyObject *
slot_defaults_call(SlotDefaults *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *obj, **slot, *old;
    Py_ssize_t i;

    if (self->cls == NULL || self->values == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "SlotDefaults.__init__ was not called");
        return NULL;
    }
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "SlotDefaults takes one object");
        return NULL;
    }
    obj = args[0];
    if (!PyObject_TypeCheck(obj, self->cls)) {
        PyErr_Format(PyExc_TypeError, "SlotDefaults for %.100s given a %.100s",
                     self->cls->tp_name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    for (i = 0; i < self->n; i++) {
        slot = (PyObject **)((char *)obj + self->offsets[i]);
        old = *slot;
        *slot = Py_NewRef(PyTuple_GET_ITEM(self->values, i));
        Py_XDECREF(old);  /* last: a finaliser it runs sees the object filled so far */
    }
    Py_RETURN_NONE;
}

static PyObject *
slot_defaults_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                         PyObject *kwnames)
{
    return slot_defaults_call((SlotDefaults *)callable, args, nargsf, kwnames);
}

static PyObject *
slot_defaults_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    SlotDefaults *self = (SlotDefaults *)PyType_GenericNew(type, args, kwds);

    if (self != NULL)
        self->vectorcall = slot_defaults_vectorcall;
    return (PyObject *)self;
}

static int
slot_defaults_traverse(SlotDefaults *self, visitproc visit, void *arg)
{
    Py_VISIT(self->cls);
    Py_VISIT(self->values);
    return 0;
}

static int
slot_defaults_clear(SlotDefaults *self)
{
    /* the offsets stay: cls == NULL makes a call refuse */
    Py_CLEAR(self->cls);
    Py_CLEAR(self->values);
    return 0;
}

static void
slot_defaults_dealloc(SlotDefaults *self)
{
    PyObject_GC_UnTrack(self);
    slot_defaults_clear(self);
    PyMem_Free(self->offsets);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject SlotDefaultsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._speedups.SlotDefaults",
    .tp_doc = "SlotDefaults(cls, defaults)\n\n"
              "Called with a cls instance: sets each __slots__ member named in defaults to "
              "its value.",
    .tp_basicsize = sizeof(SlotDefaults),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = slot_defaults_new,
    .tp_init = (initproc)slot_defaults_init,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(SlotDefaults, vectorcall),
    .tp_dealloc = (destructor)slot_defaults_dealloc,
    .tp_traverse = (traverseproc)slot_defaults_traverse,
    .tp_clear = (inquiry)slot_defaults_clear,
};

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

    if (PyType_Ready(&RequestFieldsType) < 0 || heads_module_init() < 0
        || PyType_Ready(&SlotDefaultsType) < 0)
        return NULL;
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    if (empty_bytes == NULL)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "RequestFields", (PyObject *)&RequestFieldsType) < 0
        || PyModule_AddObjectRef(m, "Heads", (PyObject *)&HeadsType) < 0
        || PyModule_AddObjectRef(m, "TraceChild", (PyObject *)&TraceChildType) < 0
        || PyModule_AddObjectRef(m, "SlotDefaults", (PyObject *)&SlotDefaultsType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
