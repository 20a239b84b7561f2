/*
 * Accepting plain connections in batches, each with its first bytes.
 *
 * The plain listener's socket asks the kernel to queue a connection for accept
 * only once its first bytes are in (TCP_DEFER_ACCEPT), so for most connections
 * what one accept4() and one recv() return is the whole request head. Done
 * from Python, each connection costs a socket object (whose constructor asks
 * the kernel for the socket's name), an ioctl to make it non-blocking and the
 * conversions of its family and type to enums, before a byte is read. Here one
 * call takes every connection waiting, up to a limit, and gives back for each
 * its descriptor (non-blocking and close-on-exec from accept4, Nagle's
 * algorithm off as inherited from the listening socket), its peer's address
 * as Python's socket module spells it, and what it has sent so far. Python
 * makes a socket object only for a connection that needs one (one that
 * becomes a transport).
 *
 * Errors. A connection that failed before it was accepted (ECONNABORTED,
 * EPROTO) or was reset before its first byte is skipped, closed, with no
 * trace: nobody is left to answer. Running out of descriptors or memory is
 * raised if it happens at the first accept, and otherwise ends the batch: the
 * listening socket stays readable, so the next call meets it again and raises
 * then. Nothing is released or retried on another thread: accept4() and a
 * recv() that does not wait are quick, and letting the GIL go for them would
 * cost more than they do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

/* The peer's address as socket.getpeername() gives it: (host, port) for IPv4,
 * (host, port, flowinfo, scope_id) for IPv6 (the host with its %scope when it
 * has one), None for anything else. */
static PyObject *
peer_address(const struct sockaddr_storage *addr, socklen_t len)
{
    char host[NI_MAXHOST];
    if (addr->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)addr;
        if (inet_ntop(AF_INET, &v4->sin_addr, host, sizeof host) == NULL)
            Py_RETURN_NONE;
        return Py_BuildValue("(si)", host, ntohs(v4->sin_port));
    }
    if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)addr;
        if (getnameinfo((const struct sockaddr *)addr, len, host, sizeof host, NULL, 0,
                        NI_NUMERICHOST) != 0)
            Py_RETURN_NONE;
        return Py_BuildValue("(siII)", host, ntohs(v6->sin6_port),
                             (unsigned int)ntohl(v6->sin6_flowinfo),
                             (unsigned int)v6->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

/* Close the descriptors of a batch that cannot be handed back. */
static void
close_batch(PyObject *batch)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(batch); i++) {
        PyObject *fd = PyTuple_GET_ITEM(PyList_GET_ITEM(batch, i), 0);
        close((int)PyLong_AsLong(fd));
    }
}

static PyObject *
accept_batch(PyObject *module, PyObject *args)
{
    int listen_fd, limit;
    Py_ssize_t read_size;
    if (!PyArg_ParseTuple(args, "iin:accept_batch", &listen_fd, &limit, &read_size))
        return NULL;
    if (read_size < 1) {
        PyErr_SetString(PyExc_ValueError, "read_size must be at least 1");
        return NULL;
    }
    char *buffer = PyMem_Malloc((size_t)read_size);
    if (buffer == NULL)
        return PyErr_NoMemory();
    PyObject *batch = PyList_New(0);
    if (batch == NULL)
        goto error;
    while (PyList_GET_SIZE(batch) < limit) {
        struct sockaddr_storage addr;
        socklen_t addr_len = sizeof addr;
        int fd = accept4(listen_fd, (struct sockaddr *)&addr, &addr_len,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
                continue; /* this one connection's matter */
            if (errno == EAGAIN || errno == EWOULDBLOCK || PyList_GET_SIZE(batch) > 0)
                break;
            PyErr_SetFromErrno(PyExc_OSError);
            goto error;
        }
        ssize_t got;
        do {
            got = recv(fd, buffer, (size_t)read_size, 0);
        } while (got < 0 && errno == EINTR);
        if (got < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                close(fd); /* reset before a byte came: nothing to answer */
                continue;
            }
            got = 0; /* nothing yet */
        }
        PyObject *peer = peer_address(&addr, addr_len);
        PyObject *item = peer == NULL ? NULL : Py_BuildValue("(iNy#)", fd, peer, buffer, got);
        if (item == NULL) {
            close(fd);
            goto error;
        }
        int appended = PyList_Append(batch, item);
        Py_DECREF(item);
        if (appended < 0) {
            close(fd);
            goto error;
        }
    }
    PyMem_Free(buffer);
    return batch;

error:
    PyMem_Free(buffer);
    if (batch != NULL) {
        close_batch(batch);
        Py_DECREF(batch);
    }
    return NULL;
}

static PyMethodDef accept_methods[] = {
    {"accept_batch", accept_batch, METH_VARARGS,
     "accept_batch(listen_fd, limit, read_size) -> [(fd, peer, data)]. Accept up to limit "
     "waiting connections on a non-blocking listening socket, each non-blocking and "
     "close-on-exec, with its peer's address (as getpeername() gives it, or None) and "
     "what it has sent (up to read_size bytes; b'' if nothing yet, or at its end). "
     "Raises OSError when the first accept fails for want of descriptors or memory."},
    {NULL},
};

static struct PyModuleDef accept_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wsgate.gateway._accept",
    .m_doc = "Plain connections accepted in batches with their first bytes, in C.",
    .m_size = -1,
    .m_methods = accept_methods,
};

PyMODINIT_FUNC
PyInit__accept(void)
{
    return PyModule_Create(&accept_module);
}
