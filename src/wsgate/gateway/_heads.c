/*
 * The common WebSocket heads, read and written in one call each.
 *
 * Every upgrade has two heads read on the event loop: the client's request
 * (from the first bytes the listener accepted it with) and the backend's 101
 * (which the relay's thread read whole). httptools reads each of them with a
 * call into Python per field, per part of the start line and per event, and
 * the gateway builds its head from those calls, then indexes its fields by
 * name, checks the handshake and picks the fields it forwards; at a few
 * thousand upgrades a second that is a good share of a CPU spent on two heads
 * that look alike every time.
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
 *   measures them (the target, and each field's name and value and four);
 * - a request is also a valid handshake, by the checks the gateway makes of
 *   every upgrade (RFC 9110 7.2, RFC 6455 4.2.1), each field once: a Host of
 *   the URI's grammar, "Upgrade: websocket", a Sec-WebSocket-Key of 16 bytes
 *   in base64 and "Sec-WebSocket-Version: 13". Any other request, a valid one
 *   spelt otherwise included, is left to the reader and those checks, which
 *   answer it; so a request read here is one they would pass.
 *
 * With the fields it gives what the gateway would build from them next: their
 * index (each lower-cased name and its values, in order) and the fields it
 * forwards as they are, as lines joined by CRLF: those whose lower-cased name
 * is not in the set the caller names (the hop-by-hop fields, and for a request
 * those the gateway sets itself), so which fields go on is said in one place.
 *
 * The tests compare what this returns with what the readers make of the same
 * bytes, for heads of every shape (tests/unit/test_plain_heads.py): the head,
 * every lookup of a field and the head forwarded; and check that the heads of
 * common clients and of the demo backend are of this shape.
 *
 * The same heads are written here too, once the gateway has decided what
 * goes in them: the upgrade request the backend is sent (the start line, the
 * backend's Host when the request had none, the forwarded fields as read,
 * Connection and Upgrade, and the fields the gateway sets: who the client is,
 * how it came, the request's id) and the 101 the client is sent (the status
 * line, the forwarded fields, Connection and Upgrade, the gateway's extra
 * fields such as its affinity cookie). In Python each is a list of lines, a
 * formatting of the gateway's fields and a join, a dozen objects made and
 * dropped per head; here each is one call that measures its pieces and copies
 * them into the one bytes object it returns. They write the same bytes as the
 * Python writers in head.py, which decide when to call them (only for a head
 * read here, whose forwarded fields are already laid out) and stay the one
 * writer for every other head; the tests compare the two on the heads read
 * here, in every variation the Python writers make.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
#include <string.h>

/* ASCII only, whatever the C locale says of other bytes. */
static bool
is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

static bool
is_alnum(unsigned char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool
is_hex(unsigned char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static unsigned char
lower_ascii(unsigned char c)
{
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c + ('a' - 'A')) : c;
}

/* RFC 9110 5.6.2: tchar. */
static bool
is_tchar(unsigned char c)
{
    return is_alnum(c) || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
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
        if (lower_ascii(p[i]) != (unsigned char)word[i])
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

/* The lines of a head's end-to-end fields, as they are forwarded: a buffer on
 * the stack for the usual head, grown on the heap for a large one. */
typedef struct {
    char small[2048];
    char *data;
    Py_ssize_t len, cap;
} Lines;

static void
lines_init(Lines *lines)
{
    lines->data = lines->small;
    lines->len = 0;
    lines->cap = (Py_ssize_t)sizeof lines->small;
}

static void
lines_free(Lines *lines)
{
    if (lines->data != lines->small)
        PyMem_Free(lines->data);
}

/* Append the line "name: value", after a CRLF unless it is the first;
 * -1 with MemoryError set. */
static int
lines_add(Lines *lines, const unsigned char *name, Py_ssize_t name_len,
          const unsigned char *value, Py_ssize_t value_len)
{
    Py_ssize_t sep = lines->len > 0 ? 2 : 0;
    Py_ssize_t need = lines->len + sep + name_len + value_len + 2;
    if (need > lines->cap) {
        Py_ssize_t cap = need * 2;
        char *grown = PyMem_Malloc((size_t)cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(grown, lines->data, (size_t)lines->len);
        lines_free(lines);
        lines->data = grown;
        lines->cap = cap;
    }
    char *out = lines->data + lines->len;
    if (sep) {
        *out++ = '\r';
        *out++ = '\n';
    }
    memcpy(out, name, (size_t)name_len);
    out += name_len;
    *out++ = ':';
    *out++ = ' ';
    memcpy(out, value, (size_t)value_len);
    lines->len = need;
    return 0;
}

/* RFC 9110 7.2 (the request reader's check of Host): uri-host [ ":" port ],
 * uri-host an IP-literal of hex digits, colons and dots in brackets, or a
 * reg-name (RFC 3986 3.2.2), possibly empty. */
static bool
is_valid_host(const unsigned char *v, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    if (n > 0 && v[0] == '[') {
        i = 1;
        while (i < n && (is_hex(v[i]) || v[i] == ':' || v[i] == '.'))
            i++;
        if (i == 1 || i >= n || v[i] != ']')
            return false;
        i++;
    }
    else {
        while (i < n && (is_alnum(v[i]) || (v[i] != 0 && strchr("-._~%!$&'()*+,;=", v[i]))))
            i++;
    }
    if (i < n && v[i] == ':') {
        i++;
        while (i < n && is_digit(v[i]))
            i++;
    }
    return i == n;
}

/* A Sec-WebSocket-Key of 16 bytes in base64 (RFC 6455 4.1): 22 characters of
 * the alphabet and the padding "==", the one spelling of 16 bytes. */
static bool
is_valid_key(const unsigned char *v, Py_ssize_t n)
{
    if (n != 24 || v[22] != '=' || v[23] != '=')
        return false;
    for (Py_ssize_t i = 0; i < 22; i++)
        if (!(is_alnum(v[i]) || v[i] == '+' || v[i] == '/'))
            return false;
    return true;
}

/* What the fields of one head said. */
typedef struct {
    PyObject *headers;    /* list of (name, value) */
    PyObject *index;      /* dict: lower-cased name -> list of its values, in order */
    PyObject *end_to_end; /* bytes: the fields whose names are not in `dropped`, as lines
                           * "name: value" joined by CRLF */
    Py_ssize_t end;       /* offset just past the empty line */
    Py_ssize_t measure;   /* the request reader's measure of the fields */
    bool handshake;       /* one valid Host, Upgrade: websocket, key and version 13 */
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

/* Add one field to the list and to the index (its name lower-cased), and to
 * the end-to-end lines unless its lower-cased name is in `dropped`. */
static int
add_field(Fields *out, Lines *lines, PyObject *dropped, const unsigned char *name,
          Py_ssize_t name_len, const unsigned char *value, Py_ssize_t value_len)
{
    PyObject *name_obj = PyBytes_FromStringAndSize((const char *)name, name_len);
    PyObject *value_obj = PyBytes_FromStringAndSize((const char *)value, value_len);
    PyObject *lower = PyBytes_FromStringAndSize(NULL, name_len);
    PyObject *field = NULL;
    int result = -1;
    if (name_obj == NULL || value_obj == NULL || lower == NULL)
        goto done;
    char *low = PyBytes_AS_STRING(lower);
    for (Py_ssize_t i = 0; i < name_len; i++)
        low[i] = (char)lower_ascii(name[i]);
    field = PyTuple_Pack(2, name_obj, value_obj);
    if (field == NULL || PyList_Append(out->headers, field) < 0)
        goto done;
    PyObject *values = PyDict_GetItemWithError(out->index, lower); /* borrowed */
    if (values != NULL) {
        if (PyList_Append(values, value_obj) < 0)
            goto done;
    }
    else {
        if (PyErr_Occurred())
            goto done;
        values = PyList_New(1);
        if (values == NULL)
            goto done;
        PyList_SET_ITEM(values, 0, Py_NewRef(value_obj));
        int set = PyDict_SetItem(out->index, lower, values);
        Py_DECREF(values);
        if (set < 0)
            goto done;
    }
    int is_dropped = PySet_Contains(dropped, lower);
    if (is_dropped < 0)
        goto done;
    if (!is_dropped && lines_add(lines, name, name_len, value, value_len) < 0)
        goto done;
    result = 0;
done:
    Py_XDECREF(name_obj);
    Py_XDECREF(value_obj);
    Py_XDECREF(lower);
    Py_XDECREF(field);
    return result;
}

static void
fields_clear(Fields *out)
{
    Py_CLEAR(out->headers);
    Py_CLEAR(out->index);
    Py_CLEAR(out->end_to_end);
}

/* Read the fields from offset p to the empty line. Returns 1 with *out filled
 * (new references) for a head of the plain shape, 0 for any other head
 * (nothing held), -1 with an exception set. The request reader drops the
 * blanks after a value and the response reader keeps them: a response's value
 * that ends in a blank (rare) is not of the plain shape (trim_end 0). */
static int
read_fields(const unsigned char *data, Py_ssize_t p, Py_ssize_t size, bool trim_end,
            PyObject *dropped, Fields *out)
{
    out->headers = PyList_New(0);
    out->index = PyDict_New();
    out->end_to_end = NULL;
    if (out->headers == NULL || out->index == NULL) {
        fields_clear(out);
        return -1;
    }
    Lines lines;
    lines_init(&lines);
    Py_ssize_t measure = 0;
    bool upgrade = false;
    int connection = 0;
    int hosts = 0, upgrades = 0, keys = 0, versions = 0;
    bool fields_valid = true;
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
        const unsigned char *name = data + p, *value = data + a;
        Py_ssize_t name_len = name_end - p, value_len = b - a;
        if (is_word(name, name_len, "content-length") ||
            is_word(name, name_len, "transfer-encoding") ||
            is_word(name, name_len, "proxy-connection"))
            goto other;
        if (is_word(name, name_len, "upgrade")) {
            upgrade = upgrade || value_len > 0; /* an empty one asks for nothing, as httptools reads it */
            upgrades++;
            fields_valid = fields_valid && is_word(value, value_len, "websocket");
        }
        else if (is_word(name, name_len, "connection"))
            connection |= connection_options(value, value_len);
        else if (is_word(name, name_len, "host")) {
            hosts++;
            fields_valid = fields_valid && is_valid_host(value, value_len);
        }
        else if (is_word(name, name_len, "sec-websocket-key")) {
            keys++;
            fields_valid = fields_valid && is_valid_key(value, value_len);
        }
        else if (is_word(name, name_len, "sec-websocket-version")) {
            versions++;
            fields_valid = fields_valid && value_len == 2 && memcmp(value, "13", 2) == 0;
        }
        measure += name_len + value_len + 4;
        if (add_field(out, &lines, dropped, name, name_len, value, value_len) < 0)
            goto failed;
        p = eol + 2;
    }
    if (!upgrade || connection != CONNECTION_UPGRADE)
        goto other;
    out->end_to_end = PyBytes_FromStringAndSize(lines.data, lines.len);
    lines_free(&lines);
    if (out->end_to_end == NULL) {
        fields_clear(out);
        return -1;
    }
    out->end = p;
    out->measure = measure;
    out->handshake =
        fields_valid && hosts == 1 && upgrades == 1 && keys == 1 && versions == 1;
    return 1;
other:
    lines_free(&lines);
    fields_clear(out);
    return 0;
failed:
    lines_free(&lines);
    fields_clear(out);
    return -1;
}

/* The request head at the start of data[0, size) if it is of the plain shape
 * and a valid WebSocket handshake, or None; NULL with an exception set. */
static PyObject *
read_upgrade_request(const unsigned char *data, Py_ssize_t size, Py_ssize_t max_head_size,
                     PyObject *dropped)
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
    int read = read_fields(data, eol + 2, size, true, dropped, &fields);
    if (read <= 0)
        return read < 0 ? NULL : Py_NewRef(Py_None);
    if (!fields.handshake || (target_end - target) + fields.measure > max_head_size) {
        fields_clear(&fields);
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(y#y#NNNn)", (const char *)data, method_len - 1,
                         (const char *)data + target, target_end - target, fields.headers,
                         fields.index, fields.end_to_end, fields.end);
}

/* The 101 head at the start of data[0, size), or None for another shape; NULL
 * with an exception set. */
static PyObject *
read_switching_response(const unsigned char *data, Py_ssize_t size, PyObject *dropped)
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
    int read = read_fields(data, eol + 2, size, false, dropped, &fields);
    if (read <= 0)
        return read < 0 ? NULL : Py_NewRef(Py_None);
    return Py_BuildValue("(y#NNNn)", (const char *)data + reason, reason_end - reason,
                         fields.headers, fields.index, fields.end_to_end, fields.end);
}

static PyObject *
upgrade_request(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t max_head_size;
    PyObject *dropped;
    if (!PyArg_ParseTuple(args, "y*nO!:upgrade_request", &view, &max_head_size,
                          &PyFrozenSet_Type, &dropped))
        return NULL;
    PyObject *result = read_upgrade_request(view.buf, view.len, max_head_size, dropped);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
switching_response(PyObject *module, PyObject *args)
{
    Py_buffer view;
    PyObject *dropped;
    if (!PyArg_ParseTuple(args, "y*O!:switching_response", &view, &PyFrozenSet_Type,
                          &dropped))
        return NULL;
    PyObject *result = read_switching_response(view.buf, view.len, dropped);
    PyBuffer_Release(&view);
    return result;
}

/* -- the writers ------------------------------------------------------------- */

/* A run of bytes one of the written heads is made of, borrowed from an argument
 * or a literal. */
typedef struct {
    const char *data;
    Py_ssize_t len;
} Piece;

#define LITERAL(s) ((Piece){(s), (Py_ssize_t)sizeof(s) - 1})

/* Enough pieces for an upgrade request, and for a 101 with a few extra fields:
 * the common heads need no allocation but their own. */
enum { SMALL_PIECES = 40 };

/* The pieces joined, as one new bytes object; NULL with an exception set. */
static PyObject *
joined(const Piece *pieces, Py_ssize_t count)
{
    Py_ssize_t size = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (pieces[i].len > PY_SSIZE_T_MAX - size)
            return PyErr_NoMemory();
        size += pieces[i].len;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < count; i++) {
        memcpy(p, pieces[i].data, (size_t)pieces[i].len);
        p += pieces[i].len;
    }
    return out;
}

/* The bytes of a bytes argument; -1 with TypeError set for any other type. */
static int
bytes_piece(PyObject *arg, const char *name, Piece *piece)
{
    if (!PyBytes_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes, not %.200s", name,
                     Py_TYPE(arg)->tp_name);
        return -1;
    }
    piece->data = PyBytes_AS_STRING(arg);
    piece->len = PyBytes_GET_SIZE(arg);
    return 0;
}

/* A field's value or None: None and b"" both say "websocket", as Python's
 * `value or b"websocket"` does. */
static int
upgrade_piece(PyObject *arg, Piece *piece)
{
    if (arg == Py_None)
        piece->len = 0;
    else if (bytes_piece(arg, "upgrade", piece) < 0)
        return -1;
    if (piece->len == 0)
        *piece = LITERAL("websocket");
    return 0;
}

/* A str argument in UTF-8, as str.encode() gives it (a lone surrogate is the
 * same UnicodeEncodeError); -1 with an exception set. */
static int
text_piece(PyObject *arg, const char *name, Piece *piece)
{
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s must be str, not %.200s", name,
                     Py_TYPE(arg)->tp_name);
        return -1;
    }
    piece->data = PyUnicode_AsUTF8AndSize(arg, &piece->len);
    return piece->data == NULL ? -1 : 0;
}

static bool
arg_count(const char *function, Py_ssize_t nargs, Py_ssize_t expected)
{
    if (nargs == expected)
        return true;
    PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)", function,
                 expected, nargs);
    return false;
}

/* write_upgrade_request(method, target, has_host, end_to_end, upgrade_field,
 *                       client_ip, proto, request_id, backend_host) */
static PyObject *
write_upgrade_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (!arg_count("write_upgrade_request", nargs, 9))
        return NULL;
    Piece method, target, end_to_end, upgrade, ip, proto, request_id, host;
    int has_host = PyObject_IsTrue(args[2]);
    if (has_host < 0 || bytes_piece(args[0], "method", &method) < 0 ||
        bytes_piece(args[1], "target", &target) < 0 ||
        bytes_piece(args[3], "end_to_end", &end_to_end) < 0 || upgrade_piece(args[4], &upgrade) < 0 ||
        text_piece(args[5], "client_ip", &ip) < 0 || text_piece(args[6], "proto", &proto) < 0 ||
        text_piece(args[7], "request_id", &request_id) < 0 ||
        text_piece(args[8], "backend_host", &host) < 0)
        return NULL;
    Piece pieces[SMALL_PIECES];
    Py_ssize_t n = 0;
    pieces[n++] = method;
    pieces[n++] = LITERAL(" ");
    pieces[n++] = target;
    pieces[n++] = LITERAL(" HTTP/1.1\r\n");
    if (!has_host) { /* the request named no authority: the backend's */
        pieces[n++] = LITERAL("Host: ");
        pieces[n++] = host;
        pieces[n++] = LITERAL("\r\n");
    }
    if (end_to_end.len > 0) {
        pieces[n++] = end_to_end;
        pieces[n++] = LITERAL("\r\n");
    }
    pieces[n++] = LITERAL("Connection: Upgrade\r\nUpgrade: ");
    pieces[n++] = upgrade;
    pieces[n++] = LITERAL("\r\nX-Forwarded-For: ");
    pieces[n++] = ip;
    pieces[n++] = LITERAL("\r\nX-Forwarded-Proto: ");
    pieces[n++] = proto;
    pieces[n++] = LITERAL("\r\nX-Real-IP: ");
    pieces[n++] = ip;
    pieces[n++] = LITERAL("\r\nForwarded: for=");
    /* RFC 7239 section 6: an IPv6 node is bracketed, and then quoted. */
    bool ipv6 = ip.len > 0 && memchr(ip.data, ':', (size_t)ip.len) != NULL;
    if (ipv6)
        pieces[n++] = LITERAL("\"[");
    pieces[n++] = ip;
    if (ipv6)
        pieces[n++] = LITERAL("]\"");
    pieces[n++] = LITERAL(";proto=");
    pieces[n++] = proto;
    pieces[n++] = LITERAL("\r\nX-Request-Id: ");
    pieces[n++] = request_id;
    pieces[n++] = LITERAL("\r\n\r\n");
    return joined(pieces, n);
}

/* write_switching_response(reason, end_to_end, upgrade_field, extra) */
static PyObject *
write_switching_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (!arg_count("write_switching_response", nargs, 4))
        return NULL;
    Piece reason, end_to_end, upgrade;
    if (bytes_piece(args[0], "reason", &reason) < 0 ||
        bytes_piece(args[1], "end_to_end", &end_to_end) < 0 || upgrade_piece(args[2], &upgrade) < 0)
        return NULL;
    if (reason.len == 0) /* HTTPStatus(101).phrase */
        reason = LITERAL("Switching Protocols");
    /* A list or tuple is used as it is; nothing runs Python code while its
     * items are borrowed. */
    PyObject *extra = PySequence_Fast(args[3], "extra must be an iterable of (name, value)");
    if (extra == NULL)
        return NULL;
    Py_ssize_t fields = PySequence_Fast_GET_SIZE(extra);
    PyObject **items = PySequence_Fast_ITEMS(extra);
    Piece small[SMALL_PIECES];
    Piece *pieces = small;
    PyObject *result = NULL;
    /* 9 pieces around the extra fields' 4 each */
    if (fields > (PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(Piece) - 9) / 4) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t need = 9 + 4 * fields;
    if (need > SMALL_PIECES) {
        pieces = PyMem_New(Piece, (size_t)need);
        if (pieces == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    Py_ssize_t n = 0;
    pieces[n++] = LITERAL("HTTP/1.1 101 ");
    pieces[n++] = reason;
    pieces[n++] = LITERAL("\r\n");
    if (end_to_end.len > 0) {
        pieces[n++] = end_to_end;
        pieces[n++] = LITERAL("\r\n");
    }
    pieces[n++] = LITERAL("Connection: Upgrade\r\nUpgrade: ");
    pieces[n++] = upgrade;
    pieces[n++] = LITERAL("\r\n");
    for (Py_ssize_t i = 0; i < fields; i++) {
        PyObject *field = items[i];
        if (!PyTuple_Check(field) || PyTuple_GET_SIZE(field) != 2) {
            PyErr_Format(PyExc_TypeError, "extra fields must be (name, value) tuples, not %.200s",
                         Py_TYPE(field)->tp_name);
            goto done;
        }
        if (bytes_piece(PyTuple_GET_ITEM(field, 0), "an extra field's name", &pieces[n]) < 0 ||
            bytes_piece(PyTuple_GET_ITEM(field, 1), "an extra field's value", &pieces[n + 2]) < 0)
            goto done;
        pieces[n + 1] = LITERAL(": ");
        pieces[n + 3] = LITERAL("\r\n");
        n += 4;
    }
    pieces[n++] = LITERAL("\r\n");
    result = joined(pieces, n);
done:
    if (pieces != small)
        PyMem_Free(pieces);
    Py_DECREF(extra);
    return result;
}

static PyMethodDef methods[] = {
    {"upgrade_request", upgrade_request, METH_VARARGS,
     "upgrade_request(data, max_head_size, dropped) -> "
     "(method, target, headers, index, end_to_end, end) or None\n\n"
     "The WebSocket upgrade request head at the start of data, if it is of the plain "
     "shape and a valid handshake; None for any other bytes. end_to_end holds the "
     "fields whose lower-cased names are not in the frozenset dropped."},
    {"switching_response", switching_response, METH_VARARGS,
     "switching_response(data, dropped) -> (reason, headers, index, end_to_end, end) or None\n\n"
     "The 101 head at the start of data, if it is of the plain shape; None for any "
     "other bytes."},
    {"write_upgrade_request", (PyCFunction)(void (*)(void))write_upgrade_request, METH_FASTCALL,
     "write_upgrade_request(method, target, has_host, end_to_end, upgrade_field, client_ip, "
     "proto, request_id, backend_host) -> bytes\n\n"
     "The upgrade request head the backend is sent, as head.render_request writes it: "
     "has_host says whether the request had a Host field (else backend_host is sent), "
     "upgrade_field is its first Upgrade value or None, end_to_end its forwarded fields "
     "as lines joined by CRLF."},
    {"write_switching_response", (PyCFunction)(void (*)(void))write_switching_response,
     METH_FASTCALL,
     "write_switching_response(reason, end_to_end, upgrade_field, extra) -> bytes\n\n"
     "The 101 head the client is sent, as head.render_response writes it: extra is an "
     "iterable of (name, value) tuples of bytes, written last."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wsgate.gateway._heads",
    .m_doc = "The common WebSocket heads, read and written in one call each, in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__heads(void)
{
    return PyModule_Create(&module);
}
