/*
 * The common WebSocket heads, read in one call.
 *
 * Every upgrade has two heads read on the event loop: the client's request
 * (from the first bytes the listener accepted it with) and the backend's 101
 * (which the relay's thread read whole). httptools reads each of them with a
 * call into Python per field, per part of the start line and per event, and
 * the gateway builds its head from those calls; at a few thousand upgrades a
 * second that is a good share of a CPU spent on two heads that look alike
 * every time.
 *
 * This module reads only heads of the plainest shape, and everything else
 * says None: the caller then reads the same bytes with httptools, as it always
 * did, so nothing is decided here that httptools would decide otherwise. The
 * shape:
 *
 * - the start line is "GET <target> HTTP/1.1" with a target in origin form
 *   (a '/' and then visible ASCII), or "HTTP/1.1 101" with or without a
 *   reason (visible ASCII, spaces, tabs, obs-text, neither starting nor ending
 *   in a blank);
 * - each field is a token, a colon, optional blanks, a value of visible
 *   ASCII, spaces, tabs and obs-text; the value is given without its leading
 *   and trailing blanks, as the request reader takes it (a response's value
 *   must not end in one: its reader would keep them);
 * - every line ends in CRLF, and an empty line ends the head;
 * - there is an Upgrade field with a value, and a Connection field (one or more) whose
 *   every option is "upgrade" or "keep-alive", one at least "upgrade": the
 *   message is an upgrade, and nothing asks to close;
 * - no Content-Length, Transfer-Encoding or Proxy-Connection (the framing
 *   and the connection's fate, which httptools decides, are not in doubt);
 * - for a request, its fields measure at most max_head_size as the reader
 *   measures them (the target, and each field's name and value and four).
 *
 * The tests compare what this returns with what the readers make of the same
 * bytes, for heads of every shape (tests/unit/test_heads_c.py), and check that
 * the heads of common clients and of the demo backend are of this shape.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
#include <string.h>

/* RFC 9110 5.6.2: tchar. */
static bool
is_tchar(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return true;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* A byte of a field's value or of a reason: HTAB, SP, VCHAR, obs-text. */
static bool
is_text(unsigned char c)
{
    return c == '\t' || (c >= 0x20 && c != 0x7f);
}

static bool
is_blank(unsigned char c)
{
    return c == ' ' || c == '\t';
}

/* Whether [p, p+n) equals the lower-case ASCII word, ignoring case. */
static bool
is_word(const unsigned char *p, Py_ssize_t n, const char *word)
{
    Py_ssize_t len = (Py_ssize_t)strlen(word);
    if (n != len)
        return false;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c >= 'A' && c <= 'Z')
            c = (unsigned char)(c + ('a' - 'A'));
        if (c != (unsigned char)word[i])
            return false;
    }
    return true;
}

/* The end of the line that starts at p (the offset of its CR), or -1 when the
 * line holds a CR or LF that is not its CRLF, or no CRLF comes before end. */
static Py_ssize_t
line_end(const unsigned char *data, Py_ssize_t p, Py_ssize_t end)
{
    for (Py_ssize_t i = p; i < end; i++) {
        if (data[i] == '\r')
            return i + 1 < end && data[i + 1] == '\n' ? i : -1;
        if (data[i] == '\n')
            return -1;
    }
    return -1;
}

/* What the fields of one head said. */
typedef struct {
    PyObject *headers; /* list of (name, value) */
    Py_ssize_t end;    /* offset just past the empty line */
    Py_ssize_t measure; /* the request reader's measure of the fields */
} Fields;

enum { CONNECTION_UPGRADE = 1, CONNECTION_OTHER = 2 };

/* The options of one Connection value: CONNECTION_UPGRADE when one is
 * "upgrade", CONNECTION_OTHER when one is anything but "upgrade" or
 * "keep-alive" (empty options between commas are nothing). */
static int
connection_options(const unsigned char *v, Py_ssize_t n)
{
    int found = 0;
    Py_ssize_t i = 0;
    while (i <= n) {
        Py_ssize_t start = i;
        while (i < n && v[i] != ',')
            i++;
        Py_ssize_t a = start, b = i;
        while (a < b && is_blank(v[a]))
            a++;
        while (b > a && is_blank(v[b - 1]))
            b--;
        if (b > a) {
            if (is_word(v + a, b - a, "upgrade"))
                found |= CONNECTION_UPGRADE;
            else if (!is_word(v + a, b - a, "keep-alive"))
                found |= CONNECTION_OTHER;
        }
        i++; /* past the comma, or past the end */
    }
    return found;
}

/* Read the fields from offset p to the empty line. Returns 1 with *out filled
 * (a new list in out->headers) for a head of the plain shape, 0 for any other
 * head (nothing allocated), -1 with an exception set. The request reader drops
 * the blanks after a value and the response reader keeps them: a response's
 * value that ends in a blank (rare) is not of the plain shape (trim_end 0). */
static int
read_fields(const unsigned char *data, Py_ssize_t p, Py_ssize_t size, bool trim_end,
            Fields *out)
{
    PyObject *headers = PyList_New(0);
    if (headers == NULL)
        return -1;
    Py_ssize_t measure = 0;
    bool upgrade = false;
    int connection = 0;
    for (;;) {
        Py_ssize_t eol = line_end(data, p, size);
        if (eol < 0)
            goto other;
        if (eol == p) { /* the empty line */
            p = eol + 2;
            break;
        }
        Py_ssize_t name_end = p;
        while (name_end < eol && is_tchar(data[name_end]))
            name_end++;
        if (name_end == p || name_end == eol || data[name_end] != ':')
            goto other;
        Py_ssize_t a = name_end + 1, b = eol;
        for (Py_ssize_t i = a; i < b; i++)
            if (!is_text(data[i]))
                goto other;
        while (a < b && is_blank(data[a]))
            a++;
        if (b > a && is_blank(data[b - 1]) && !trim_end)
            goto other;
        while (b > a && is_blank(data[b - 1]))
            b--;
        const unsigned char *name = data + p;
        Py_ssize_t name_len = name_end - p;
        if (is_word(name, name_len, "content-length") ||
            is_word(name, name_len, "transfer-encoding") ||
            is_word(name, name_len, "proxy-connection"))
            goto other;
        if (is_word(name, name_len, "upgrade"))
            upgrade = upgrade || b > a; /* an empty one asks for nothing, as httptools reads it */
        else if (is_word(name, name_len, "connection"))
            connection |= connection_options(data + a, b - a);
        measure += name_len + (b - a) + 4;
        PyObject *field = Py_BuildValue("(y#y#)", (const char *)name, name_len,
                                        (const char *)data + a, b - a);
        if (field == NULL || PyList_Append(headers, field) < 0) {
            Py_XDECREF(field);
            Py_DECREF(headers);
            return -1;
        }
        Py_DECREF(field);
        p = eol + 2;
    }
    if (!upgrade || connection != CONNECTION_UPGRADE)
        goto other;
    out->headers = headers;
    out->end = p;
    out->measure = measure;
    return 1;
other:
    Py_DECREF(headers);
    return 0;
}

/* The request head at the start of data[0, size), or None for another shape;
 * NULL with an exception set. */
static PyObject *
read_upgrade_request(const unsigned char *data, Py_ssize_t size, Py_ssize_t max_head_size)
{
    static const char method[] = "GET ";
    static const char version[] = " HTTP/1.1";
    const Py_ssize_t method_len = sizeof method - 1, version_len = sizeof version - 1;
    Py_ssize_t eol = line_end(data, 0, size);
    if (eol < method_len + 1 + version_len || memcmp(data, method, method_len) != 0 ||
        memcmp(data + eol - version_len, version, version_len) != 0)
        Py_RETURN_NONE;
    Py_ssize_t target = method_len, target_end = eol - version_len;
    if (data[target] != '/')
        Py_RETURN_NONE;
    for (Py_ssize_t i = target; i < target_end; i++)
        if (data[i] <= 0x20 || data[i] >= 0x7f)
            Py_RETURN_NONE;
    Fields fields;
    int read = read_fields(data, eol + 2, size, true, &fields);
    if (read <= 0)
        return read < 0 ? NULL : Py_NewRef(Py_None);
    if ((target_end - target) + fields.measure > max_head_size) {
        Py_DECREF(fields.headers);
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(y#y#Nn)", (const char *)data, method_len - 1,
                         (const char *)data + target, target_end - target, fields.headers,
                         fields.end);
}

/* The 101 head at the start of data[0, size), or None for another shape; NULL
 * with an exception set. */
static PyObject *
read_switching_response(const unsigned char *data, Py_ssize_t size)
{
    static const char status[] = "HTTP/1.1 101";
    const Py_ssize_t status_len = sizeof status - 1;
    Py_ssize_t eol = line_end(data, 0, size);
    if (eol < status_len || memcmp(data, status, status_len) != 0)
        Py_RETURN_NONE;
    Py_ssize_t reason = eol, reason_end = eol;
    if (eol > status_len) {
        if (data[status_len] != ' ')
            Py_RETURN_NONE;
        reason = status_len + 1;
        for (Py_ssize_t i = reason; i < eol; i++)
            if (!is_text(data[i]))
                Py_RETURN_NONE;
        if (reason_end > reason && (is_blank(data[reason]) || is_blank(data[reason_end - 1])))
            Py_RETURN_NONE;
    }
    Fields fields;
    int read = read_fields(data, eol + 2, size, false, &fields);
    if (read <= 0)
        return read < 0 ? NULL : Py_NewRef(Py_None);
    return Py_BuildValue("(y#Nn)", (const char *)data + reason, reason_end - reason,
                         fields.headers, fields.end);
}

static PyObject *
upgrade_request(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t max_head_size;
    if (!PyArg_ParseTuple(args, "y*n:upgrade_request", &view, &max_head_size))
        return NULL;
    PyObject *result = read_upgrade_request(view.buf, view.len, max_head_size);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
switching_response(PyObject *module, PyObject *args)
{
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*:switching_response", &view))
        return NULL;
    PyObject *result = read_switching_response(view.buf, view.len);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"upgrade_request", upgrade_request, METH_VARARGS,
     "upgrade_request(data, max_head_size) -> (method, target, headers, end) or None\n\n"
     "The WebSocket upgrade request head at the start of data, if it is of the plain "
     "shape; None for any other bytes."},
    {"switching_response", switching_response, METH_VARARGS,
     "switching_response(data) -> (reason, headers, end) or None\n\n"
     "The 101 head at the start of data, if it is of the plain shape; None for any "
     "other bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wsgate.gateway._heads",
    .m_doc = "The common WebSocket heads, read in one call, in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__heads(void)
{
    return PyModule_Create(&module);
}
