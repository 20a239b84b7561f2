/*
 * The relay of established WebSocket sessions, out of Python's byte path.
 *
 * Once a session is set up, the gateway hands the two sockets to a Relay: a
 * thread of its own, blocked in epoll_wait on those sockets alone, that moves
 * the bytes of every ready socket in C (recv into one scratch buffer, send to
 * the other side) without the GIL. Python hears from it only when a session
 * ends, and keeps everything else: the slot, the timers, the decision to close.
 * One wait per wake-up, as in any event-driven proxy; and while Python sets up
 * new sessions on one core, the bytes of established ones move on another.
 *
 * Per session (a Link):
 * - Flow control: a socket is read only while nothing waits to be written to
 *   its peer. A partial send keeps the rest in a buffer, stops reading the
 *   source and waits for the peer to be writable. So at most one read's worth
 *   waits per direction, and an end of stream is seen only after everything
 *   read before it has been handed to the peer's kernel buffer.
 * - Frame boundaries: the backend-to-client stream goes through a frame
 *   tracker (headers only, RFC 6455 section 5.2) so that a close frame asked
 *   for by the gateway is written between two frames, never inside one.
 * - The end: the first end of stream or error on either side ends the session
 *   and calls back into Python once (on_end). Bytes still waiting for a slow
 *   peer are flushed afterwards ("lingering") for at most `linger` seconds; a
 *   timerfd in the same epoll set cuts what is left, with a reset.
 * - The backend's socket: when the relay closes it (at the end, after its
 *   flush, or when the linger runs out) Python hears so once more
 *   (on_backend_closed), after on_end if any. Until then the backend may still
 *   count the session, so that is when the gateway frees its slot.
 *
 * - Lingering links are on a list of their own: the once-a-second sweep that
 *   cuts overdue flushes visits them and nothing else.
 *
 * Threads. The relay thread and Python's calls that change a link (add,
 * close_gracefully, finish, report, close) take one mutex; the relay thread
 * never touches a Python object or its reference count, and Python sets no
 * exception and makes no call into Python while it holds the mutex. The
 * counters Python reads (bytes, outcome, lingering, len) are atomic: reading
 * them never waits for a batch. The relay reports through an eventfd, written
 * only when no earlier write still waits for report() (so one wake-up of the
 * loop takes the news of many batches when Python is busy). The event loop
 * watches the relay's second epoll set, the loop's set (fileno()), which holds
 * that eventfd and the sockets of the dials in progress: report() takes what
 * is ready there (a dial's event, the relay thread's news), then calls
 * on_answer(owner, answer, error) for each dial that is over, on_end(owner,
 * outcome) for each ended session, on_backend_closed(owner) for each closed
 * backend socket, and drops the relay's reference to the links it is done
 * with. A link is let go only when no batch of events can point at it any
 * more: one the relay thread closed, at the end of that batch (the next wait
 * starts after the close); one Python closed between two batches, after the
 * next whole batch, since that batch may have been fetched before the close.
 *
 * Dialing. For an upgrade the relay can also open the backend's side itself
 * (dial): Python makes the decision and hands over the backend's address and
 * the request's bytes. The call connects and tries to write the request
 * itself: on loopback the handshake is done by the time connect() returns.
 * The socket then waits in the loop's set, and report() writes the rest of
 * the request once it is writable and reads until the response head is whole,
 * on Python's thread: the relay thread never sees a dial before it is a
 * session. Handing the answer to the relay thread would wake it once per
 * upgrade for a few hundred bytes, only for it to wake the event loop in
 * turn: on a CPU the two threads share, that is two context switches per
 * upgrade, and the loop's next call into the relay then waits on the mutex
 * the woken thread holds. The backend's socket never becomes an event-loop
 * transport. The head read, the socket leaves the loop's set and Python reads
 * the answer: to a 101 it attaches the client's socket with the head to send
 * it (both sockets enter the relay's set, and the link relays from then on,
 * as if added); any other answer it takes the socket back (take) and reads the
 * rest of the response itself. Until attached, a link counts in no session
 * figure and reports no end; a dial Python gives up on (abort) is closed at
 * once and reports nothing more.
 *
 * Lifetime. A relay holds a reference to each of its links and each link one
 * to its relay and to its owner; both types take part in the collector, so a
 * relay nobody closed and nobody refers to is found, stopped (its thread
 * joined, its sockets closed) and freed with its links. Closing it is still
 * the way to stop it at a known moment.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define CLIENT 0
#define BACKEND 1

/* The counters Python reads (bytes, outcome, state, how many relay or linger)
 * are written under the lock but read without it: written and read atomically,
 * so a reader never waits for a batch to end. */
#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)
#define STORE(field, value) __atomic_store_n(&(field), (value), __ATOMIC_RELAXED)
#define ADD(field, value) __atomic_add_fetch(&(field), (value), __ATOMIC_RELAXED)
#define OPCODE_CLOSE 0x8
#define MAX_HEADER 14
#define EVENTS_PER_RUN 256
/* A backend's answer to a dialed upgrade is reported once its head is whole, or
 * once this much came without one (Python then finds it malformed). */
#define MAX_ANSWER (64 * 1024)
/* What report() reads of a dial's answer at a time (on its stack). */
#define ANSWER_READ (16 * 1024)
/* dial_error of an answer cut short: the backend closed before its head ended. */
#define ANSWER_CUT (-1)

/* -- frame tracker ------------------------------------------------------------------- */

typedef struct {
    uint64_t remaining;               /* payload bytes of the current frame not seen yet */
    unsigned char head[MAX_HEADER];   /* a header cut by the end of the last chunk */
    Py_ssize_t head_len;
    int opcode;                       /* of the last frame whose header is complete */
} Tracker;

static void
tracker_init(Tracker *t)
{
    t->remaining = 0;
    t->head_len = 0;
    t->opcode = -1;
}

static int
tracker_at_boundary(const Tracker *t)
{
    return t->remaining == 0 && t->head_len == 0;
}

/* Header size and payload length of the header at `head` (`size` bytes
 * available); 0 while the header is cut short. A 64-bit length's top bit must
 * be zero (RFC 6455 section 5.2); it is dropped so arithmetic cannot overflow. */
static Py_ssize_t
parse_header(const unsigned char *head, Py_ssize_t size, uint64_t *length)
{
    if (size < 2)
        return 0;
    unsigned second = head[1];
    uint64_t len = second & 0x7F;
    Py_ssize_t header = (second & 0x80) ? 6 : 2;
    if (len == 126)
        header += 2;
    else if (len == 127)
        header += 8;
    if (size < header)
        return 0;
    if (len == 126) {
        len = (uint64_t)head[2] << 8 | head[3];
    }
    else if (len == 127) {
        len = 0;
        for (int i = 2; i < 10; i++)
            len = len << 8 | head[i];
        len &= UINT64_C(0x7FFFFFFFFFFFFFFF);
    }
    *length = len;
    return header;
}

/* Follow one chunk of the stream. Returns the offset just after the last frame
 * that ends inside it (data[:offset] may be sent, then a close frame), or -1
 * when no frame ends in this chunk. */
static Py_ssize_t
tracker_feed(Tracker *t, const unsigned char *data, Py_ssize_t size)
{
    uint64_t pos;
    if (t->remaining > (uint64_t)size) {
        t->remaining -= (uint64_t)size;
        return -1;
    }
    if (t->head_len) {
        /* Finish the header kept from the last chunk. */
        unsigned char head[MAX_HEADER];
        Py_ssize_t kept = t->head_len;
        Py_ssize_t take = size < MAX_HEADER - kept ? size : MAX_HEADER - kept;
        memcpy(head, t->head, kept);
        memcpy(head + kept, data, take);
        uint64_t length;
        Py_ssize_t header = parse_header(head, kept + take, &length);
        if (header == 0) {
            memcpy(t->head + kept, data, take);
            t->head_len = kept + take;
            return -1;
        }
        t->opcode = head[0] & 0x0F;
        t->head_len = 0;
        uint64_t end = (uint64_t)(header - kept) + length;
        if (end > (uint64_t)size) {
            t->remaining = end - (uint64_t)size;
            return -1;
        }
        pos = end;
    }
    else {
        pos = t->remaining; /* zero when the chunk starts with a frame header */
    }
    /* From here on `pos` is where a frame starts and the previous one ended. */
    int64_t start = -1; /* where the last frame that ended in this loop started */
    while (pos + 1 < (uint64_t)size) {
        unsigned second = data[pos + 1];
        uint64_t end;
        if (second < 126) {
            end = pos + 2 + second; /* unmasked, 7-bit length: most frames a server sends */
        }
        else {
            uint64_t length;
            Py_ssize_t header = parse_header(data + pos, size - (Py_ssize_t)pos, &length);
            if (header == 0)
                break;
            end = pos + (uint64_t)header + length;
        }
        if (end > (uint64_t)size) {
            t->remaining = end - (uint64_t)size;
            t->opcode = data[pos] & 0x0F;
            return pos ? (Py_ssize_t)pos : -1;
        }
        start = (int64_t)pos;
        pos = end;
    }
    if (start >= 0)
        t->opcode = data[start] & 0x0F;
    t->remaining = 0;
    t->head_len = (Py_ssize_t)((uint64_t)size - pos); /* at most 13 bytes */
    memcpy(t->head, data + pos, t->head_len);
    return pos ? (Py_ssize_t)pos : -1;
}

/* -- FrameTracker: the tracker on its own, for tests and measurements ---------------- */

typedef struct {
    PyObject_HEAD
    Tracker tracker;
} FrameTrackerObject;

static int
FrameTracker_init(FrameTrackerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":FrameTracker", kwlist))
        return -1;
    tracker_init(&self->tracker);
    return 0;
}

static PyObject *
FrameTracker_feed(FrameTrackerObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t offset = tracker_feed(&self->tracker, view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(offset);
}

static PyObject *
FrameTracker_at_boundary(FrameTrackerObject *self, void *closure)
{
    return PyBool_FromLong(tracker_at_boundary(&self->tracker));
}

static PyObject *
FrameTracker_close_seen(FrameTrackerObject *self, void *closure)
{
    return PyBool_FromLong(self->tracker.opcode == OPCODE_CLOSE);
}

static PyMethodDef FrameTracker_methods[] = {
    {"feed", (PyCFunction)FrameTracker_feed, METH_O,
     "Follow one chunk; the offset just after the last frame ending in it, or -1."},
    {NULL},
};

static PyGetSetDef FrameTracker_getset[] = {
    {"at_boundary", (getter)FrameTracker_at_boundary, NULL,
     "True when every byte fed so far belongs to complete frames.", NULL},
    {"close_seen", (getter)FrameTracker_close_seen, NULL,
     "True when the last frame whose header is complete is a close frame.", NULL},
    {NULL},
};

static PyTypeObject FrameTrackerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wsgate.gateway._relay.FrameTracker",
    .tp_doc = "Where frames end in a stream of WebSocket frames fed chunk by chunk.",
    .tp_basicsize = sizeof(FrameTrackerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FrameTracker_init,
    .tp_methods = FrameTracker_methods,
    .tp_getset = FrameTracker_getset,
};

/* -- links and the relay ---------------------------------------------------------------- */

typedef struct {
    char *data;
    size_t off, len, cap;
} OutBuffer;

struct LinkObject;

typedef struct {
    struct LinkObject *link;
    int fd;            /* -1 once closed */
    int side;          /* CLIENT or BACKEND */
    uint32_t interest; /* what epoll watches for now */
    int registered;    /* in an epoll set: the loop's while dialing, the relay's after */
    int sole;          /* no other descriptor shares its socket (see end_close) */
    OutBuffer out;     /* bytes waiting to be written to this socket */
} End;

/* A dialed link goes DIALING (connecting, writing the request), ANSWERING
 * (reading the response head), both in the loop's set, ANSWERED (in no set,
 * waiting for Python to attach the client or take the socket), then RELAYING
 * as an added one. */
enum { DIALING, ANSWERING, ANSWERED, RELAYING, LINGERING, CLOSED };

enum {
    OUTCOME_NONE,
    OUTCOME_CLIENT_CLOSED,
    OUTCOME_CLIENT_ERROR,
    OUTCOME_BACKEND_CLOSED,
    OUTCOME_BACKEND_ERROR,
    OUTCOME_FINISHED,
    OUTCOMES
};

static const char *outcome_names[OUTCOMES] = {
    NULL, "client_closed", "client_error", "backend_closed", "backend_error", "finished",
};
static PyObject *outcome_strings[OUTCOMES];

/* A close frame fits: 2 bytes of header, 4 of mask, 125 of payload. */
#define MAX_CLOSE_FRAME 131

typedef struct {
    unsigned char data[MAX_CLOSE_FRAME];
    size_t len;
} CloseFrame;

/* What a gateway-initiated close writes; allocated only for sessions it closes. */
typedef struct {
    CloseFrame client, backend;
} CloseFrames;

struct RelayObject;

typedef struct LinkObject {
    PyObject_HEAD
    struct RelayObject *relay; /* strong; the link's fields are the relay's, under its lock */
    End ends[2];
    Tracker tracker; /* of the backend-to-client stream */
    unsigned long long bytes_in, bytes_out;
    int state;
    int outcome;
    int injected; /* our close frames are written; nothing more is relayed */
    CloseFrames *close; /* set when the gateway closes: the frames wait for a boundary */
    struct timespec linger_since;
    struct LinkObject *prev, *next; /* the relay's list of links with open sockets */
    struct LinkObject *linger_prev, *linger_next; /* its list of lingering links */
    struct LinkObject *next_ended;  /* on the relay's list of links to report */
    struct LinkObject *next_gone;   /* on one of its lists of links with no socket left */
    struct LinkObject *next_backend_gone; /* on the relay's list of backend sockets closed */
    struct LinkObject *next_answered; /* on the relay's list of dials to report */
    OutBuffer answer; /* a dial's response head, as read */
    int connected;    /* a dial's connect has completed */
    int dial_error;   /* why a dial failed: an errno, ANSWER_CUT, or 0 */
    PyObject *owner; /* handed to on_end; Python's side only (touched with the GIL) */
} LinkObject;

typedef struct RelayObject {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_t thread;
    int thread_started;
    int stopping;
    int epfd;
    int timerfd;  /* ticks while sessions linger, to cut stuck flushes */
    int kickfd;   /* wakes the relay thread: to stop, or to retire closed links */
    int reportfd; /* readable while something waits for report() */
    int loopfd;   /* the event loop's set: reportfd and the dials in progress */
    int signalled; /* reportfd written since the last report(): one wake-up serves all */
    unsigned char *scratch;
    size_t scratch_size;
    double linger;
    PyObject *on_end;
    PyObject *on_backend_closed; /* or NULL */
    PyObject *on_answer; /* or NULL: dials are not offered */
    LinkObject *links; /* the relay holds a reference to each until it is freeable */
    LinkObject *lingering_links; /* those of `links` that linger: what the sweep visits */
    Py_ssize_t count;  /* links relaying */
    Py_ssize_t lingering;
    LinkObject *answered; /* dials to report: answered or failed */
    LinkObject *ended;    /* to report */
    LinkObject *backend_gone; /* backend socket closed: to report after `ended` */
    LinkObject *released; /* no socket left: closed by Python, or in the batch in progress */
    LinkObject *freeable; /* no batch can point at them any more */
} RelayObject;

static PyTypeObject LinkType;
static PyTypeObject RelayType;

static void end_close(RelayObject *relay, End *end);

static void
signal_fd(int fd)
{
    uint64_t one = 1;
    if (fd >= 0 && write(fd, &one, sizeof one) < 0) {
        /* EAGAIN: the counter is full, so the reader is due anyway. */
    }
}

/* Under the lock: whether `pending` news must wake Python, which it need not
 * when an earlier signal has not been taken by report() yet. */
static int
relay_due(RelayObject *relay, int pending)
{
    if (!pending || relay->signalled)
        return 0;
    relay->signalled = 1;
    return 1;
}

static void
drain_fd(int fd)
{
    uint64_t count;
    if (read(fd, &count, sizeof count) < 0) {
        /* EAGAIN: read already. */
    }
}

static int
out_append(OutBuffer *out, const char *data, size_t size)
{
    if (size == 0)
        return 0;
    if (out->len + size > out->cap) {
        if (out->off) { /* make room at the front first */
            memmove(out->data, out->data + out->off, out->len - out->off);
            out->len -= out->off;
            out->off = 0;
        }
        if (out->len + size > out->cap) {
            size_t cap = out->cap ? out->cap : 4096;
            while (cap < out->len + size)
                cap *= 2;
            char *grown = PyMem_RawRealloc(out->data, cap);
            if (grown == NULL)
                return -1;
            out->data = grown;
            out->cap = cap;
        }
    }
    memcpy(out->data + out->len, data, size);
    out->len += size;
    return 0;
}

static void
out_free(OutBuffer *out)
{
    PyMem_RawFree(out->data);
    out->data = NULL;
    out->off = out->len = out->cap = 0;
}

static int
out_pending(const End *end)
{
    return end->out.len > end->out.off;
}

static void
end_watch_in(int epfd, End *end, uint32_t interest)
{
    if (end->fd < 0 || end->interest == interest)
        return;
    struct epoll_event event = {.events = interest, .data.ptr = end};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, end->fd, &event) == 0)
        end->interest = interest;
}

static void
end_watch(RelayObject *relay, End *end, uint32_t interest)
{
    end_watch_in(relay->epfd, end, interest);
}

/* A dial's socket waits in the loop's set (see "Dialing" above) for its
 * connect, then for its answer. */
#define ANSWER_INTEREST EPOLLIN

/* Watch each socket for what it can do now: read while its peer has nothing
 * waiting, write while it has something waiting. */
static void
link_watch(LinkObject *link)
{
    End *client = &link->ends[CLIENT], *backend = &link->ends[BACKEND];
    if (link->state == RELAYING) {
        end_watch(link->relay, client,
                  (out_pending(backend) ? 0 : EPOLLIN) | (out_pending(client) ? EPOLLOUT : 0));
        end_watch(link->relay, backend,
                  (out_pending(client) ? 0 : EPOLLIN) | (out_pending(backend) ? EPOLLOUT : 0));
    }
    else if (link->state == LINGERING) {
        end_watch(link->relay, client, EPOLLOUT);
        end_watch(link->relay, backend, EPOLLOUT);
    }
}

static void
relay_arm_sweep(RelayObject *relay, int on)
{
    struct itimerspec spec = {{0, 0}, {0, 0}};
    if (on) {
        /* Often enough to cut a stuck flush within a second of its deadline. */
        spec.it_interval.tv_sec = 1;
        spec.it_value.tv_sec = 1;
    }
    timerfd_settime(relay->timerfd, 0, &spec, NULL);
}

static int
side_error(int side)
{
    return side == CLIENT ? OUTCOME_CLIENT_ERROR : OUTCOME_BACKEND_ERROR;
}

/* The link has no open socket left. */
static void
link_release(LinkObject *link)
{
    RelayObject *relay = link->relay;
    if (link->state == LINGERING) {
        if (link->linger_prev)
            link->linger_prev->linger_next = link->linger_next;
        else
            relay->lingering_links = link->linger_next;
        if (link->linger_next)
            link->linger_next->linger_prev = link->linger_prev;
        link->linger_prev = link->linger_next = NULL;
        if (ADD(relay->lingering, -1) == 0)
            relay_arm_sweep(relay, 0);
    }
    STORE(link->state, CLOSED);
    if (link->prev)
        link->prev->next = link->next;
    else
        relay->links = link->next;
    if (link->next)
        link->next->prev = link->prev;
    link->prev = link->next = NULL;
    link->next_gone = relay->released;
    relay->released = link;
}

/* End a relaying link: close what has nothing left to write, flush the rest. */
static void
link_end(LinkObject *link, int outcome, int report)
{
    if (link->state != RELAYING)
        return;
    RelayObject *relay = link->relay;
    STORE(link->outcome, outcome);
    ADD(relay->count, -1);
    int lingering = 0;
    for (int side = CLIENT; side <= BACKEND; side++) {
        End *end = &link->ends[side];
        if (end->fd >= 0 && out_pending(end) && outcome != side_error(side))
            lingering = 1;
        else
            end_close(relay, end);
    }
    if (lingering) {
        STORE(link->state, LINGERING);
        clock_gettime(CLOCK_MONOTONIC, &link->linger_since);
        link->linger_prev = NULL;
        link->linger_next = relay->lingering_links;
        if (relay->lingering_links)
            relay->lingering_links->linger_prev = link;
        relay->lingering_links = link;
        if (ADD(relay->lingering, 1) == 1)
            relay_arm_sweep(relay, 1);
        link_watch(link);
    }
    else {
        link_release(link);
    }
    if (report) {
        link->next_ended = relay->ended;
        relay->ended = link;
    }
}

static void
end_close(RelayObject *relay, End *end)
{
    LinkObject *link = end->link;
    if (end->fd >= 0) {
        /* Closing the last descriptor of a socket takes it out of the epoll set:
         * a socket the relay alone holds (a dial's, an arrival's) is just closed.
         * One handed over as a duplicate may still be open in the event loop for
         * a moment, and would stay in the set, its events pointing at this end. */
        if (!end->sole)
            epoll_ctl(relay->epfd, EPOLL_CTL_DEL, end->fd, NULL);
        close(end->fd);
        end->fd = -1;
        end->registered = 0;
        if (end->side == BACKEND) {
            /* From now on the backend cannot count this session: Python may free its slot. */
            link->next_backend_gone = relay->backend_gone;
            relay->backend_gone = link;
        }
    }
    out_free(&end->out);
    if (link->state == LINGERING && link->ends[CLIENT].fd < 0 && link->ends[BACKEND].fd < 0)
        link_release(link);
}

/* Close a socket whose flush ran out of time: with a reset, so that its peer
 * stops counting the connection now, not after reading what is left. */
static void
end_cut(RelayObject *relay, End *end)
{
    if (end->fd >= 0) {
        struct linger now = {.l_onoff = 1, .l_linger = 0};
        setsockopt(end->fd, SOL_SOCKET, SO_LINGER, &now, sizeof now);
    }
    end_close(relay, end);
}

/* Write what waits for this socket; -1 when the socket failed. */
static int
end_flush(End *end)
{
    OutBuffer *out = &end->out;
    while (out->off < out->len) {
        ssize_t sent = send(end->fd, out->data + out->off, out->len - out->off,
                            MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent >= 0)
            out->off += (size_t)sent;
        else if (errno == EINTR)
            continue;
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            break;
        else
            return -1;
    }
    if (out->off == out->len)
        out_free(out); /* an idle session holds no buffer */
    return 0;
}

/* Send `data` to this socket after what already waits for it. */
static void
end_send(End *end, const void *data, size_t size)
{
    LinkObject *link = end->link;
    if (end->fd < 0 || size == 0)
        return;
    if (!out_pending(end)) {
        ssize_t sent;
        do {
            sent = send(end->fd, data, size, MSG_NOSIGNAL | MSG_DONTWAIT);
        } while (sent < 0 && errno == EINTR);
        if (sent < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                link_end(link, side_error(end->side), 1);
                return;
            }
            sent = 0;
        }
        data = (const char *)data + sent;
        size -= (size_t)sent;
        if (size == 0)
            return;
    }
    if (out_append(&end->out, data, size) < 0) {
        /* No memory for the rest of a read: the session cannot be relayed intact. */
        link_end(link, side_error(end->side), 1);
    }
}

static void
link_inject(LinkObject *link)
{
    link->injected = 1;
    /* From here on nothing more is relayed either way; the backend hears that
     * we are going away as a client would say it, and both are left to close. */
    end_send(&link->ends[CLIENT], link->close->client.data, link->close->client.len);
    if (link->state == RELAYING)
        end_send(&link->ends[BACKEND], link->close->backend.data, link->close->backend.len);
}

/* Bytes the backend sent, on their way to the client. */
static void
link_from_backend(LinkObject *link, const unsigned char *data, Py_ssize_t size)
{
    ADD(link->bytes_out, (unsigned long long)size);
    Py_ssize_t boundary = tracker_feed(&link->tracker, data, size);
    End *client = &link->ends[CLIENT];
    if (link->close == NULL) {
        end_send(client, data, (size_t)size);
    }
    else if (!link->injected) {
        if (boundary < 0 || link->tracker.opcode == OPCODE_CLOSE) {
            /* Still inside a frame, or the backend's own close is passing. */
            end_send(client, data, (size_t)size);
        }
        else {
            end_send(client, data, (size_t)boundary);
            if (link->state == RELAYING)
                link_inject(link);
        }
    }
    /* After our close frame, nothing more reaches the client. */
}

static void
link_readable(RelayObject *relay, End *end)
{
    LinkObject *link = end->link;
    ssize_t size;
    do {
        size = recv(end->fd, relay->scratch, relay->scratch_size, 0);
    } while (size < 0 && errno == EINTR);
    if (size > 0) {
        if (end->side == BACKEND) {
            link_from_backend(link, relay->scratch, size);
        }
        else {
            ADD(link->bytes_in, (unsigned long long)size);
            if (!link->injected)
                end_send(&link->ends[BACKEND], relay->scratch, (size_t)size);
        }
    }
    else if (size == 0) {
        link_end(link, end->side == CLIENT ? OUTCOME_CLIENT_CLOSED : OUTCOME_BACKEND_CLOSED, 1);
    }
    else if (errno != EAGAIN && errno != EWOULDBLOCK) {
        link_end(link, side_error(end->side), 1);
    }
}

/* -- dials: the backend's side opened by the relay ------------------------------------ */

/* Whether a head ends in `data`: a blank line (CRLF CRLF, or bare LFs as
 * lenient parsers accept), looked for from `from` on. */
static int
head_complete(const char *data, size_t len, size_t from)
{
    size_t at = from > 3 ? from - 3 : 0;
    while (at < len) {
        const char *lf = memchr(data + at, '\n', len - at);
        if (lf == NULL)
            return 0;
        size_t i = (size_t)(lf - data);
        if (i + 1 < len && data[i + 1] == '\n')
            return 1;
        if (i + 2 < len && data[i + 1] == '\r' && data[i + 2] == '\n')
            return 1;
        at = i + 1;
    }
    return 0;
}

/* Close a link that never relayed: its only socket is the backend's. No end and
 * no closed backend is reported for it (Python learns of it by other means). */
static void
link_drop_dial(RelayObject *relay, LinkObject *link)
{
    End *backend = &link->ends[BACKEND];
    if (backend->fd >= 0) {
        if (backend->registered) /* a dial's only set is the loop's */
            epoll_ctl(relay->loopfd, EPOLL_CTL_DEL, backend->fd, NULL);
        close(backend->fd);
        backend->fd = -1;
        backend->interest = 0;
        backend->registered = 0;
    }
    out_free(&backend->out);
    link_release(link);
}

/* The dial is over: answered (error 0: the socket leaves the loop's set and
 * waits for Python: a session's start puts it in the relay's, a take gives it
 * to the event loop) or failed (the socket is closed). Either way it is
 * reported. */
static void
link_dial_done(RelayObject *relay, LinkObject *link, int error)
{
    link->dial_error = error;
    if (error) {
        link_drop_dial(relay, link);
    }
    else {
        End *backend = &link->ends[BACKEND];
        if (backend->registered)
            epoll_ctl(relay->loopfd, EPOLL_CTL_DEL, backend->fd, NULL);
        backend->registered = 0;
        backend->interest = 0;
        STORE(link->state, ANSWERED);
    }
    link->next_answered = relay->answered;
    relay->answered = link;
}

/* Write what is left of a dial's request: the errno of a failed send (the dial
 * is over: a refused connect says so here), or 0. A socket still connecting
 * takes nothing (EAGAIN); once any of the request went it is connected, and
 * once all of it went the dial waits for the answer (ANSWERING). */
static int
dial_write(LinkObject *link)
{
    End *backend = &link->ends[BACKEND];
    if (end_flush(backend) < 0)
        return errno ? errno : EPIPE;
    int written = !out_pending(backend);
    if (written || backend->out.off > 0)
        STORE(link->connected, 1);
    if (written)
        STORE(link->state, ANSWERING);
    return 0;
}

/* One event of a dial's socket, on Python's thread (from report(), with the
 * lock held): `buffer` is the caller's, the relay thread's scratch being its own. */
static void
link_dial_event(RelayObject *relay, LinkObject *link, End *backend, char *buffer,
                size_t buffer_size)
{
    if (link->state == DIALING) {
        /* Writable: connected, or failed, and then the send says why. */
        int failure = dial_write(link);
        if (failure)
            link_dial_done(relay, link, failure);
        else if (link->state == ANSWERING)
            end_watch_in(relay->loopfd, backend, ANSWER_INTEREST);
        /* else the rest when writable again */
        return;
    }
    if (link->state != ANSWERING)
        return; /* over since this batch was fetched */
    ssize_t size;
    do {
        size = recv(backend->fd, buffer, buffer_size, 0);
    } while (size < 0 && errno == EINTR);
    if (size > 0) {
        size_t seen = link->answer.len;
        if (out_append(&link->answer, buffer, (size_t)size) < 0)
            link_dial_done(relay, link, ENOMEM);
        else if (head_complete(link->answer.data, link->answer.len, seen) ||
                 link->answer.len >= MAX_ANSWER)
            link_dial_done(relay, link, 0);
        /* else the rest of the head when it comes */
    }
    else if (size == 0) {
        link_dial_done(relay, link, ANSWER_CUT);
    }
    else if (errno != EAGAIN && errno != EWOULDBLOCK) {
        link_dial_done(relay, link, errno);
    }
}

static void
relay_event(RelayObject *relay, End *end, uint32_t events)
{
    LinkObject *link = end->link;
    if (end->fd < 0 || link->state == CLOSED)
        return; /* closed since this batch was fetched */
    if (link->state == LINGERING) {
        if ((events & (EPOLLERR | EPOLLHUP)) || end_flush(end) < 0 || !out_pending(end))
            end_close(relay, end);
        return;
    }
    if ((events & EPOLLOUT) && out_pending(end)) {
        if (end_flush(end) < 0) {
            link_end(link, side_error(end->side), 1);
            return;
        }
    }
    if (end->interest & EPOLLIN) {
        if (events & (EPOLLIN | EPOLLERR | EPOLLHUP))
            link_readable(relay, end);
    }
    else if (events & (EPOLLERR | EPOLLHUP)) {
        /* Reset while not being read (its peer is slow): nothing more can pass. */
        link_end(link, side_error(end->side), 1);
    }
    link_watch(link);
}

static void
relay_sweep(RelayObject *relay)
{
    drain_fd(relay->timerfd);
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    LinkObject *link = relay->lingering_links;
    while (link != NULL) {
        LinkObject *next = link->linger_next; /* the cut below takes it off the list */
        double waited = (double)(now.tv_sec - link->linger_since.tv_sec) +
                        (double)(now.tv_nsec - link->linger_since.tv_nsec) / 1e9;
        if (waited >= relay->linger) {
            end_cut(relay, &link->ends[CLIENT]);
            end_cut(relay, &link->ends[BACKEND]);
        }
        link = next;
    }
}

static LinkObject *
gone_append(LinkObject *list, LinkObject *more)
{
    if (more == NULL)
        return list;
    LinkObject *last = more;
    while (last->next_gone != NULL)
        last = last->next_gone;
    last->next_gone = list;
    return more;
}

static void *
relay_thread(void *arg)
{
    RelayObject *relay = arg;
    struct epoll_event events[EVENTS_PER_RUN];
    for (;;) {
        int ready = epoll_wait(relay->epfd, events, EVENTS_PER_RUN, -1);
        if (ready < 0 && errno != EINTR)
            ready = 0; /* cannot happen with a valid epfd; stay responsive to stop */
        pthread_mutex_lock(&relay->lock);
        if (relay->stopping) {
            pthread_mutex_unlock(&relay->lock);
            return NULL;
        }
        /* Closed by Python before this batch began: this batch may still point at
         * them, none after it can. */
        LinkObject *retiring = relay->released;
        relay->released = NULL;
        for (int i = 0; i < ready; i++) {
            void *what = events[i].data.ptr;
            if (what == &relay->kickfd)
                drain_fd(relay->kickfd);
            else if (what == &relay->timerfd)
                relay_sweep(relay);
            else
                relay_event(relay, what, events[i].events);
        }
        relay->freeable = gone_append(gone_append(relay->freeable, retiring), relay->released);
        relay->released = NULL;
        int report = relay_due(relay, relay->ended != NULL || relay->backend_gone != NULL ||
                                          relay->freeable != NULL || relay->answered != NULL);
        pthread_mutex_unlock(&relay->lock);
        if (report)
            signal_fd(relay->reportfd);
    }
}

/* What report() does after taking the lists: call on_answer, on_end, then
 * on_backend_closed, then let go of links. The lists are taken together, and a
 * link's backend socket is closed no later than its end is recorded and before
 * it can be freeable, so each link hears of its end first and of its backend
 * socket after. Runs on Python's thread with the GIL and without the lock. */
static void
relay_deliver(RelayObject *relay, LinkObject *answered, LinkObject *ended,
              LinkObject *backend_gone, LinkObject *freeable)
{
    while (answered != NULL) {
        LinkObject *link = answered;
        answered = link->next_answered;
        link->next_answered = NULL;
        /* The dial is over: its socket is in no set (answered) or closed. */
        PyObject *answer = PyBytes_FromStringAndSize(link->answer.data,
                                                     (Py_ssize_t)link->answer.len);
        out_free(&link->answer);
        PyObject *owner = Py_XNewRef(link->owner);
        if (answer == NULL) {
            PyErr_WriteUnraisable((PyObject *)link);
        }
        else if (owner != NULL && relay->on_answer != NULL) {
            PyObject *error = PyLong_FromLong(link->dial_error);
            PyObject *result = error == NULL ? NULL
                : PyObject_CallFunctionObjArgs(relay->on_answer, owner, answer, error, NULL);
            if (result == NULL)
                PyErr_WriteUnraisable(relay->on_answer);
            Py_XDECREF(result);
            Py_XDECREF(error);
        }
        Py_XDECREF(answer);
        Py_XDECREF(owner);
    }
    while (ended != NULL) {
        LinkObject *link = ended;
        ended = link->next_ended;
        link->next_ended = NULL;
        PyObject *owner = Py_XNewRef(link->owner); /* kept for on_backend_closed */
        if (owner != NULL && relay->on_end != NULL) {
            PyObject *result = PyObject_CallFunctionObjArgs(
                relay->on_end, owner, outcome_strings[link->outcome], NULL);
            if (result == NULL)
                PyErr_WriteUnraisable(relay->on_end);
            Py_XDECREF(result);
        }
        Py_XDECREF(owner);
    }
    while (backend_gone != NULL) {
        LinkObject *link = backend_gone;
        backend_gone = link->next_backend_gone;
        link->next_backend_gone = NULL;
        PyObject *owner = link->owner; /* nothing more is said to it */
        link->owner = NULL;
        if (owner != NULL && relay->on_backend_closed != NULL) {
            PyObject *result = PyObject_CallOneArg(relay->on_backend_closed, owner);
            if (result == NULL)
                PyErr_WriteUnraisable(relay->on_backend_closed);
            Py_XDECREF(result);
        }
        Py_XDECREF(owner);
    }
    while (freeable != NULL) {
        LinkObject *link = freeable;
        freeable = link->next_gone;
        link->next_gone = NULL;
        Py_CLEAR(link->owner);
        Py_DECREF(link);
    }
}

/* -- making and starting links (Python's thread, with the GIL) ---------------------- */

/* A new link of `relay` holding two descriptors (-1: none yet). Not on the
 * relay's lists yet; the caller's reference is the one returned. */
static LinkObject *
link_new(RelayObject *relay, int state, int client_fd, int backend_fd, PyObject *owner)
{
    LinkObject *link = PyObject_GC_New(LinkObject, &LinkType);
    if (link == NULL)
        return NULL;
    link->relay = (RelayObject *)Py_NewRef(relay);
    tracker_init(&link->tracker);
    link->bytes_in = link->bytes_out = 0;
    link->state = state;
    link->outcome = OUTCOME_NONE;
    link->injected = 0;
    link->close = NULL;
    link->owner = Py_NewRef(owner);
    link->prev = link->next = link->next_ended = link->next_gone = NULL;
    link->linger_prev = link->linger_next = link->next_backend_gone = NULL;
    link->next_answered = NULL;
    memset(&link->answer, 0, sizeof link->answer);
    link->connected = 0;
    link->dial_error = 0;
    int fds[2] = {client_fd, backend_fd};
    for (int side = CLIENT; side <= BACKEND; side++) {
        End *end = &link->ends[side];
        end->link = link;
        end->fd = fds[side];
        end->side = side;
        end->interest = 0;
        end->registered = 0;
        end->sole = 0;
        memset(&end->out, 0, sizeof end->out);
    }
    PyObject_GC_Track(link);
    return link;
}

/* Put a new link on the relay's list: from now on it holds a reference of its
 * own (with the GIL and the lock held). */
static void
relay_adopt(RelayObject *relay, LinkObject *link)
{
    Py_INCREF(link); /* the relay's, until the link is freeable */
    link->next = relay->links;
    if (relay->links)
        relay->links->prev = link;
    relay->links = link;
}

/* Relay from now on: both sockets watched, `head` then `rest` on their way to
 * the client (`rest` as if the backend had just sent it). Returns 0, or the
 * errno of a failed registration (the link is then finished, unreported). */
static int
link_start(RelayObject *relay, LinkObject *link, const void *head, Py_ssize_t head_len,
           const void *rest, Py_ssize_t rest_len)
{
    STORE(link->state, RELAYING);
    ADD(relay->count, 1);
    for (int side = CLIENT; side <= BACKEND; side++) {
        End *end = &link->ends[side];
        struct epoll_event event = {.events = EPOLLIN, .data.ptr = end};
        if (epoll_ctl(relay->epfd, EPOLL_CTL_ADD, end->fd, &event) < 0) {
            int failure = errno;
            link_end(link, OUTCOME_FINISHED, 0);
            return failure;
        }
        end->registered = 1;
        end->interest = EPOLLIN;
    }
    if (head_len)
        end_send(&link->ends[CLIENT], head, (size_t)head_len);
    if (rest_len && link->state == RELAYING)
        link_from_backend(link, rest, rest_len);
    link_watch(link);
    return 0;
}

/* Unlock after a change Python made to `link`: tell Python what ended (or a
 * dial that failed at once), and have the relay thread retire the link if the
 * change closed it. */
static void
relay_unlock(RelayObject *relay, LinkObject *link)
{
    int report = relay_due(relay, relay->ended != NULL || relay->backend_gone != NULL ||
                                      relay->answered != NULL);
    int kick = link->state == CLOSED;
    pthread_mutex_unlock(&relay->lock);
    if (report)
        signal_fd(relay->reportfd);
    if (kick)
        signal_fd(relay->kickfd);
}

/* -- Link's Python face ----------------------------------------------------------------- */

static int
Link_traverse(LinkObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->relay);
    return 0;
}

/* The owner only: the relay stays, since the link's fields are the relay's to
 * change until it lets the link go (the relay's own clear does that). */
static int
Link_clear(LinkObject *self)
{
    Py_CLEAR(self->owner);
    return 0;
}

static void
Link_dealloc(LinkObject *self)
{
    PyObject_GC_UnTrack(self);
    for (int side = CLIENT; side <= BACKEND; side++)
        out_free(&self->ends[side].out);
    out_free(&self->answer);
    PyMem_RawFree(self->close);
    Py_XDECREF(self->owner);
    Py_XDECREF(self->relay);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
copy_frame(CloseFrame *frame, PyObject *bytes)
{
    Py_ssize_t size = PyBytes_GET_SIZE(bytes);
    if (size > MAX_CLOSE_FRAME) {
        PyErr_SetString(PyExc_ValueError, "a close frame is at most 131 bytes");
        return -1;
    }
    memcpy(frame->data, PyBytes_AS_STRING(bytes), (size_t)size);
    frame->len = (size_t)size;
    return 0;
}

static PyObject *
Link_close_gracefully(LinkObject *self, PyObject *args)
{
    PyObject *client_close, *backend_close;
    if (!PyArg_ParseTuple(args, "SS:close_gracefully", &client_close, &backend_close))
        return NULL;
    CloseFrames *frames = PyMem_RawMalloc(sizeof *frames);
    if (frames == NULL)
        return PyErr_NoMemory();
    if (copy_frame(&frames->client, client_close) < 0 ||
        copy_frame(&frames->backend, backend_close) < 0) {
        PyMem_RawFree(frames);
        return NULL;
    }
    RelayObject *relay = self->relay;
    pthread_mutex_lock(&relay->lock);
    int accepted = self->state == RELAYING && self->close == NULL;
    if (accepted) {
        self->close = frames;
        frames = NULL;
        if (self->tracker.opcode == OPCODE_CLOSE) {
            /* The backend is closing already; its close frame is on its way. */
        }
        else if (tracker_at_boundary(&self->tracker)) {
            link_inject(self);
        }
        link_watch(self);
    }
    int report = relay_due(relay, relay->ended != NULL || relay->backend_gone != NULL);
    int kick = accepted && self->state == CLOSED; /* a failed send closed it: retire it */
    pthread_mutex_unlock(&relay->lock);
    PyMem_RawFree(frames); /* not taken: already closing or ended */
    if (report)
        signal_fd(relay->reportfd);
    if (kick)
        signal_fd(relay->kickfd);
    return PyBool_FromLong(accepted);
}

static PyObject *
Link_finish(LinkObject *self, PyObject *unused)
{
    RelayObject *relay = self->relay;
    pthread_mutex_lock(&relay->lock);
    int was_relaying = self->state == RELAYING;
    link_end(self, OUTCOME_FINISHED, 0);
    int kick = was_relaying && self->state == CLOSED;
    int report = relay_due(relay, relay->backend_gone != NULL);
    pthread_mutex_unlock(&relay->lock);
    if (kick)
        signal_fd(relay->kickfd); /* so that the relay thread retires it */
    if (report)
        signal_fd(relay->reportfd); /* on_backend_closed, at once or after the flush */
    Py_RETURN_NONE;
}

static PyObject *
Link_attach(LinkObject *self, PyObject *args)
{
    int client_fd, sole = 0;
    Py_buffer head, rest;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "iy*y*O|p:attach", &client_fd, &head, &rest, &owner, &sole))
        return NULL;
    RelayObject *relay = self->relay;
    PyObject *previous = NULL; /* the dial's owner, let go of once unlocked */
    pthread_mutex_lock(&relay->lock);
    int failure = -1;
    if (self->state == ANSWERED) {
        self->ends[CLIENT].fd = client_fd;
        self->ends[CLIENT].sole = sole;
        previous = self->owner; /* Python's field: the GIL is held */
        self->owner = Py_NewRef(owner);
        failure = link_start(relay, self, head.buf, head.len, rest.buf, rest.len);
    }
    relay_unlock(relay, self);
    Py_XDECREF(previous);
    PyBuffer_Release(&head);
    PyBuffer_Release(&rest);
    if (failure < 0) {
        close(client_fd);
        PyErr_SetString(PyExc_ValueError, "the link has no answered dial to attach to");
        return NULL;
    }
    if (failure) {
        errno = failure;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_CLEAR(self->owner);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Link_take(LinkObject *self, PyObject *unused)
{
    RelayObject *relay = self->relay;
    pthread_mutex_lock(&relay->lock);
    int fd = -1;
    if (self->state == ANSWERED) {
        End *backend = &self->ends[BACKEND];
        fd = backend->fd; /* in no set since its answer (link_dial_done) */
        backend->fd = -1;
        backend->registered = 0;
        link_release(self);
    }
    relay_unlock(relay, self);
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the link has no answered dial to take");
        return NULL;
    }
    return PyLong_FromLong(fd);
}

static PyObject *
Link_abort(LinkObject *self, PyObject *unused)
{
    RelayObject *relay = self->relay;
    pthread_mutex_lock(&relay->lock);
    int dialing = self->state < RELAYING;
    if (dialing)
        link_drop_dial(relay, self);
    relay_unlock(relay, self);
    return PyBool_FromLong(dialing);
}

static PyObject *
Link_connected(LinkObject *self, void *closure)
{
    return PyBool_FromLong(LOAD(self->connected));
}

static PyObject *
Link_bytes_in(LinkObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(LOAD(self->bytes_in));
}

static PyObject *
Link_bytes_out(LinkObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(LOAD(self->bytes_out));
}

static PyObject *
Link_outcome(LinkObject *self, void *closure)
{
    int outcome = LOAD(self->outcome);
    if (outcome == OUTCOME_NONE)
        Py_RETURN_NONE;
    return Py_NewRef(outcome_strings[outcome]);
}

static PyObject *
Link_lingering(LinkObject *self, void *closure)
{
    return PyBool_FromLong(LOAD(self->state) == LINGERING);
}

static PyMethodDef Link_methods[] = {
    {"close_gracefully", (PyCFunction)Link_close_gracefully, METH_VARARGS,
     "Write client_close at the next frame boundary, backend_close to the backend; "
     "False when already closing or ended."},
    {"attach", (PyCFunction)Link_attach, METH_VARARGS,
     "attach(client_fd, head, rest, owner, sole=False): relay an answered dial from now "
     "on. Takes the client's socket (closed by the relay from now on, even on error); "
     "head, then rest (as if the backend had just sent it) go to the client; owner "
     "replaces the dial's for on_end and on_backend_closed. sole: no other descriptor "
     "of that socket is open (the relay then closes it without leaving the epoll set "
     "first)."},
    {"take", (PyCFunction)Link_take, METH_NOARGS,
     "The backend's socket of an answered dial, now the caller's to read and close."},
    {"abort", (PyCFunction)Link_abort, METH_NOARGS,
     "Close a dial not attached yet, at once and without a report; False if not one."},
    {"finish", (PyCFunction)Link_finish, METH_NOARGS,
     "End the session now (no on_end call); waiting bytes are still flushed, and "
     "on_backend_closed follows once the backend's socket is closed."},
    {NULL},
};

static PyGetSetDef Link_getset[] = {
    {"bytes_in", (getter)Link_bytes_in, NULL, "Bytes read from the client.", NULL},
    {"bytes_out", (getter)Link_bytes_out, NULL, "Bytes read from the backend.", NULL},
    {"outcome", (getter)Link_outcome, NULL, "How the session ended, or None.", NULL},
    {"lingering", (getter)Link_lingering, NULL,
     "True while ended but still flushing to a slow peer.", NULL},
    {"connected", (getter)Link_connected, NULL,
     "A dial's connect has completed (True for an added link too).", NULL},
    {NULL},
};

static PyTypeObject LinkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wsgate.gateway._relay.Link",
    .tp_doc = "One session in a Relay: two sockets and what passed between them.",
    .tp_basicsize = sizeof(LinkObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)Link_dealloc,
    .tp_traverse = (traverseproc)Link_traverse,
    .tp_clear = (inquiry)Link_clear,
    .tp_methods = Link_methods,
    .tp_getset = Link_getset,
};

/* -- Relay's Python face ---------------------------------------------------------------- */

static void relay_shut(RelayObject *self, int deliver);

/* The relay holds one reference to each of its links until it lets it go, and
 * each link one to the relay: the collector must see both, or a relay never
 * closed would keep its thread and its links for ever. */
static int
Relay_traverse(RelayObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_end);
    Py_VISIT(self->on_backend_closed);
    Py_VISIT(self->on_answer);
    int failed = 0;
    pthread_mutex_lock(&self->lock);
    for (LinkObject *link = self->links; link != NULL && !failed; link = link->next)
        failed = visit((PyObject *)link, arg);
    LinkObject *lists[] = {self->released, self->freeable};
    for (size_t i = 0; i < sizeof lists / sizeof lists[0]; i++)
        for (LinkObject *link = lists[i]; link != NULL && !failed; link = link->next_gone)
            failed = visit((PyObject *)link, arg);
    pthread_mutex_unlock(&self->lock);
    return failed;
}

/* An unreachable relay: stop it and let go of everything, calling no one. */
static int
Relay_clear(RelayObject *self)
{
    relay_shut(self, 0);
    Py_CLEAR(self->on_end);
    Py_CLEAR(self->on_backend_closed);
    Py_CLEAR(self->on_answer);
    return 0;
}

/* Stop the thread, end every session without reporting it, close every
 * descriptor; report what had ended before (when `deliver`) and let go of
 * every link. */
static void
relay_shut(RelayObject *self, int deliver)
{
    if (self->thread_started) {
        pthread_mutex_lock(&self->lock);
        self->stopping = 1;
        pthread_mutex_unlock(&self->lock);
        signal_fd(self->kickfd);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(self->thread, NULL);
        Py_END_ALLOW_THREADS
        self->thread_started = 0;
    }
    pthread_mutex_lock(&self->lock);
    while (self->links != NULL) {
        LinkObject *link = self->links;
        if (link->state < RELAYING) {
            link_drop_dial(self, link); /* a dial not attached: its owner hears nothing */
            continue;
        }
        link_end(link, OUTCOME_FINISHED, 0);
        if (link->state == LINGERING) {
            end_cut(self, &link->ends[CLIENT]);
            end_cut(self, &link->ends[BACKEND]);
        }
    }
    int *fds[] = {&self->epfd, &self->timerfd, &self->kickfd, &self->reportfd, &self->loopfd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0) {
            close(*fds[i]);
            *fds[i] = -1;
        }
    }
    LinkObject *answered = self->answered;
    LinkObject *ended = self->ended, *backend_gone = self->backend_gone;
    LinkObject *gone = gone_append(self->freeable, self->released);
    self->answered = self->ended = self->backend_gone = self->freeable = self->released = NULL;
    pthread_mutex_unlock(&self->lock);
    if (deliver)
        relay_deliver(self, answered, ended, backend_gone, gone);
    else
        relay_deliver(self, NULL, NULL, NULL, gone);
}

static void
Relay_dealloc(RelayObject *self)
{
    PyObject_GC_UnTrack(self);
    relay_shut(self, 1);
    Relay_clear(self);
    PyMem_RawFree(self->scratch);
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"on_end", "on_backend_closed", "on_answer", "read_size", "linger",
                             NULL};
    PyObject *on_end, *on_backend_closed = Py_None, *on_answer = Py_None;
    Py_ssize_t read_size = 256 * 1024;
    double linger = 5.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$OOnd:Relay", kwlist, &on_end,
                                     &on_backend_closed, &on_answer, &read_size, &linger))
        return NULL;
    if (!PyCallable_Check(on_end) ||
        (on_backend_closed != Py_None && !PyCallable_Check(on_backend_closed)) ||
        (on_answer != Py_None && !PyCallable_Check(on_answer))) {
        PyErr_SetString(PyExc_TypeError,
                        "on_end, on_backend_closed and on_answer must be callable");
        return NULL;
    }
    if (read_size < 1024 || linger < 0) {
        PyErr_SetString(PyExc_ValueError, "read_size must be at least 1024 and linger >= 0");
        return NULL;
    }
    RelayObject *self = (RelayObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    pthread_mutex_init(&self->lock, NULL);
    self->epfd = self->timerfd = self->kickfd = self->reportfd = self->loopfd = -1;
    self->linger = linger;
    self->scratch = PyMem_RawMalloc((size_t)read_size);
    if (self->scratch == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->scratch_size = (size_t)read_size;
    self->on_end = Py_NewRef(on_end);
    self->on_backend_closed = on_backend_closed == Py_None ? NULL : Py_NewRef(on_backend_closed);
    self->on_answer = on_answer == Py_None ? NULL : Py_NewRef(on_answer);
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    self->kickfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->reportfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->loopfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event tick = {.events = EPOLLIN, .data.ptr = &self->timerfd};
    struct epoll_event kick = {.events = EPOLLIN, .data.ptr = &self->kickfd};
    struct epoll_event news = {.events = EPOLLIN, .data.ptr = &self->reportfd};
    if (self->epfd < 0 || self->timerfd < 0 || self->kickfd < 0 || self->reportfd < 0 ||
        self->loopfd < 0 ||
        epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->timerfd, &tick) < 0 ||
        epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->kickfd, &kick) < 0 ||
        epoll_ctl(self->loopfd, EPOLL_CTL_ADD, self->reportfd, &news) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    /* Signals are Python's main thread's business: the relay thread blocks them all. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int failed = pthread_create(&self->thread, NULL, relay_thread, self);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (failed) {
        errno = failed;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    self->thread_started = 1;
    return (PyObject *)self;
}

static PyObject *
Relay_fileno(RelayObject *self, PyObject *unused)
{
    return PyLong_FromLong(self->loopfd);
}

/* A new link the relay could not take (its sockets are closed): raise the
 * errno, set only now since no Python call is made while the relay thread may
 * wait, and let the caller's reference go. */
static PyObject *
link_refused(LinkObject *link, int failure)
{
    errno = failure;
    PyErr_SetFromErrno(PyExc_OSError);
    Py_CLEAR(link->owner);
    Py_DECREF(link);
    return NULL;
}

static PyObject *
Relay_add(RelayObject *self, PyObject *args)
{
    int client_fd, backend_fd;
    Py_buffer rest;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "iiy*O:add", &client_fd, &backend_fd, &rest, &owner))
        return NULL;
    LinkObject *link = NULL;
    if (self->epfd < 0)
        PyErr_SetString(PyExc_ValueError, "the relay is closed");
    else
        link = link_new(self, RELAYING, client_fd, backend_fd, owner);
    if (link == NULL) {
        PyBuffer_Release(&rest);
        close(client_fd);
        close(backend_fd);
        return NULL;
    }
    pthread_mutex_lock(&self->lock);
    relay_adopt(self, link);
    int failure = link_start(self, link, NULL, 0, rest.buf, rest.len);
    relay_unlock(self, link);
    PyBuffer_Release(&rest);
    return failure ? link_refused(link, failure) : (PyObject *)link;
}

/* The address of a backend given as an IP literal (no name is resolved here). */
static int
parse_ip(const char *host, int port, struct sockaddr_storage *addr, socklen_t *len)
{
    memset(addr, 0, sizeof *addr);
    struct sockaddr_in *v4 = (struct sockaddr_in *)addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)addr;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        *len = sizeof *v4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        *len = sizeof *v6;
        return 0;
    }
    return -1;
}

static PyObject *
Relay_dial(RelayObject *self, PyObject *args)
{
    const char *host;
    int port;
    Py_buffer request;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "siy*O:dial", &host, &port, &request, &owner))
        return NULL;
    struct sockaddr_storage addr;
    socklen_t addr_len;
    int fd = -1, failure = 0;
    LinkObject *link = NULL;
    if (self->epfd < 0 || self->on_answer == NULL) {
        PyErr_SetString(PyExc_ValueError,
                        self->epfd < 0 ? "the relay is closed" : "the relay takes no dials");
        goto error;
    }
    if (port < 1 || port > 65535 || parse_ip(host, port, &addr, &addr_len) < 0) {
        PyErr_Format(PyExc_ValueError, "not an IP address and port: %s:%d", host, port);
        goto error;
    }
    fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    int connected = connect(fd, (struct sockaddr *)&addr, addr_len) == 0;
    if (!connected && errno != EINPROGRESS) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    link = link_new(self, DIALING, -1, fd, owner);
    if (link == NULL)
        goto error;
    fd = -1; /* the link's now */
    End *backend = &link->ends[BACKEND];
    backend->sole = 1; /* made here, never duplicated */
    if (out_append(&backend->out, request.buf, (size_t)request.len) < 0) {
        PyErr_NoMemory();
        goto error;
    }
    /* On loopback the handshake is over by the time connect() returns, though it
     * says EINPROGRESS: the request is written here, and the loop's set first
     * wakes the event loop for the answer. What a socket still connecting did
     * not take is written by report() once it is writable. A send that fails
     * here ends the dial, reported by the next report(). The link is on no list
     * yet: nothing else can touch it. */
    link->connected = connected;
    int failed = dial_write(link);
    uint32_t interest = link->state == ANSWERING ? ANSWER_INTEREST : EPOLLOUT;
    pthread_mutex_lock(&self->lock);
    relay_adopt(self, link);
    if (failed) {
        link_dial_done(self, link, failed);
        relay_unlock(self, link);
        PyBuffer_Release(&request);
        return (PyObject *)link;
    }
    backend->interest = interest;
    backend->registered = 1;
    relay_unlock(self, link);
    /* Its events are report()'s, on this thread: the relay thread never sees a
     * dial before it is a session. */
    struct epoll_event event = {.events = interest, .data.ptr = backend};
    if (epoll_ctl(self->loopfd, EPOLL_CTL_ADD, backend->fd, &event) < 0) {
        failure = errno;
        pthread_mutex_lock(&self->lock);
        backend->interest = 0;
        backend->registered = 0;
        link_drop_dial(self, link);
        relay_unlock(self, link);
    }
    PyBuffer_Release(&request);
    return failure ? link_refused(link, failure) : (PyObject *)link;

error:
    PyBuffer_Release(&request);
    if (fd >= 0)
        close(fd);
    if (link != NULL) { /* never on the relay's lists: its socket is closed here */
        close(link->ends[BACKEND].fd);
        link->ends[BACKEND].fd = -1;
        Py_CLEAR(link->owner);
        Py_DECREF(link);
    }
    return NULL;
}

static PyObject *
Relay_report(RelayObject *self, PyObject *unused)
{
    struct epoll_event events[EVENTS_PER_RUN];
    int ready = 0;
    if (self->loopfd >= 0) {
        do {
            ready = epoll_wait(self->loopfd, events, EVENTS_PER_RUN, 0);
        } while (ready < 0 && errno == EINTR);
    }
    char buffer[ANSWER_READ];
    int kick = 0;
    pthread_mutex_lock(&self->lock);
    for (int i = 0; i < ready; i++) {
        if (events[i].data.ptr == &self->reportfd)
            continue; /* the relay thread's news: taken below */
        End *end = events[i].data.ptr;
        link_dial_event(self, end->link, end, buffer, sizeof buffer);
        kick |= end->link->state == CLOSED; /* a failed dial: the relay thread retires it */
    }
    if (self->reportfd >= 0)
        drain_fd(self->reportfd);
    self->signalled = 0; /* what comes after this taking signals anew */
    LinkObject *answered = self->answered;
    LinkObject *ended = self->ended, *backend_gone = self->backend_gone;
    LinkObject *freeable = self->freeable;
    self->answered = self->ended = self->backend_gone = self->freeable = NULL;
    pthread_mutex_unlock(&self->lock);
    if (kick)
        signal_fd(self->kickfd);
    relay_deliver(self, answered, ended, backend_gone, freeable);
    Py_RETURN_NONE;
}

static PyObject *
Relay_close(RelayObject *self, PyObject *unused)
{
    relay_shut(self, 1);
    Py_RETURN_NONE;
}

static Py_ssize_t
Relay_len(RelayObject *self)
{
    return LOAD(self->count);
}

static PyObject *
Relay_lingering(RelayObject *self, void *closure)
{
    return PyLong_FromSsize_t(LOAD(self->lingering));
}

static PyMethodDef Relay_methods[] = {
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS,
     "A descriptor that is readable while report() has something to do: the event "
     "loop's set of the relay thread's news and the dials in progress."},
    {"add", (PyCFunction)Relay_add, METH_VARARGS,
     "add(client_fd, backend_fd, rest, owner) -> Link. Takes the two sockets (closed "
     "by the relay from now on, even on error); rest goes to the client first, as if "
     "the backend had just sent it; owner is passed to on_end(owner, outcome) and "
     "to on_backend_closed(owner)."},
    {"dial", (PyCFunction)Relay_dial, METH_VARARGS,
     "dial(host, port, request, owner) -> Link. Connect to an IP address and port, "
     "write request, read the response head (in report(), on the caller's thread): "
     "on_answer(owner, answer, error) tells once, with error 0 (the head is whole, or "
     "64 KiB came without one), an errno, or -1 (the backend closed first)."},
    {"report", (PyCFunction)Relay_report, METH_NOARGS,
     "Call on_end for the sessions that ended; let go of the links the relay is done with."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS,
     "Stop the relay thread, end every session without reporting it, close every socket."},
    {NULL},
};

static PyGetSetDef Relay_getset[] = {
    {"lingering", (getter)Relay_lingering, NULL,
     "Sessions ended but still flushing to a slow peer.", NULL},
    {NULL},
};

static PySequenceMethods Relay_as_sequence = {
    .sq_length = (lenfunc)Relay_len,
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wsgate.gateway._relay.Relay",
    .tp_doc = "Relay(on_end, *, on_backend_closed=None, on_answer=None, read_size=262144, "
              "linger=5.0): "
              "established sessions, "
              "relayed in C by a thread of their own.",
    .tp_basicsize = sizeof(RelayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Relay_new,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_traverse = (traverseproc)Relay_traverse,
    .tp_clear = (inquiry)Relay_clear,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
    .tp_as_sequence = &Relay_as_sequence,
};

static struct PyModuleDef relay_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wsgate.gateway._relay",
    .m_doc = "The relay of established sessions and the WebSocket frame tracker, in C.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__relay(void)
{
    if (PyType_Ready(&FrameTrackerType) < 0 || PyType_Ready(&LinkType) < 0 ||
        PyType_Ready(&RelayType) < 0)
        return NULL;
    for (int i = 1; i < OUTCOMES; i++) {
        outcome_strings[i] = PyUnicode_InternFromString(outcome_names[i]);
        if (outcome_strings[i] == NULL)
            return NULL;
    }
    PyObject *module = PyModule_Create(&relay_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "FrameTracker", (PyObject *)&FrameTrackerType) < 0 ||
        PyModule_AddObjectRef(module, "Link", (PyObject *)&LinkType) < 0 ||
        PyModule_AddObjectRef(module, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
