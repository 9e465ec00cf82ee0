# cython: language_level=3
"""The TCP data plane: a splice(2) relay running in C worker threads, outside the GIL.

Once a CONNECT or BIND succeeded, the control plane hands both sockets of the
connection to a :class:`RelayEngine` and forgets them. Python API::

    engine = RelayEngine(workers=0, idle_timeout=0.0, pipe_size=1 << 20)
    engine.fileno() -> int        # readable (level) while finished pairs wait in drain()
    engine.add(fd_a, fd_b, ident) # takes ownership of both fds; closes them when the pair ends
    engine.cancel(ident)          # end one pair now (reason SHUTDOWN); no-op if already ended
    engine.drain() -> list[tuple[ident, bytes_a_to_b, bytes_b_to_a, RelayEnd]]
    engine.active -> int          # pairs added and not yet finished
    engine.close()                # stop the workers, close every pair (SHUTDOWN) and own fds

Strategy:

* N worker threads (default: one per usable core), each with its own epoll set.
  ``add()`` picks the least-loaded worker (ties: round robin), appends the pair to
  that worker's mutex-protected inbox and wakes it through its eventfd. The worker
  registers both sockets once, edge-triggered, for EPOLLIN | EPOLLOUT | EPOLLRDHUP;
  it never calls epoll_ctl again until the pair ends. The worker count is capped by
  ``constants.MAX_RELAY_WORKERS``, the one limit config.py checks too.
* Edge-triggered readiness is kept in two flags per socket (readable, writable),
  set by events and cleared only when a splice() answers EAGAIN. A pair with work
  left goes on the worker's ready list; each pump moves at most ``budget`` bytes per
  direction before the next pair gets its turn (fairness), and a pair whose flags
  say nothing can move leaves the list, so an idle worker sleeps in epoll_wait
  (no busy loop).
* Each direction is socket -> pipe -> socket with splice(SPLICE_F_NONBLOCK |
  SPLICE_F_MOVE); the bytes never enter user space. SPLICE_F_MORE is never set: it
  holds small segments back about 200 ms (shared/peers/README.md).
* Pipes are borrowed, not owned: a direction takes a pipe from the worker's pool
  when it has bytes to move and gives it back as soon as the pipe is empty again.
  A pipe only stays with a direction while the destination is slower than the
  source (its bytes sit in the pipe). An idle pair therefore holds no pipe at all:
  its whole cost is one small Pair struct (plus the two kernel sockets it had anyway).
  Pipes are grown with F_SETPIPE_SZ to ``pipe_size``; where the kernel refuses
  (EPERM above /proc/sys/fs/pipe-max-size or the per-user pipe quota) the worker
  halves the request down to the default size and remembers what worked.
* Half-close: a splice() returning 0 is the source's EOF; once that direction's
  pipe is drained, the destination gets shutdown(SHUT_WR). The pair ends (EOF) when
  both directions have finished.
* Resets: EPOLLERR with SO_ERROR set, or ECONNRESET / EPIPE from splice(), end the
  pair with RESET; the other socket is closed with SO_LINGER 0 so its peer sees a
  reset too (a plain FIN would make a truncated transfer look complete). Any other
  error ends the pair with ERROR (also with a reset).
* Idle timeout: pairs sit in a per-worker list ordered by last activity (moved to
  the tail whenever bytes move), so expiry checks only the head and the epoll_wait
  timeout is exact.
* Ended pairs are unregistered, closed, and queued on the worker's local list; at
  the end of each loop turn that list moves under the engine mutex to the done
  list, and the engine eventfd is written. ``drain()`` (the asyncio thread) takes
  the done list and frees the structs. Deferring the hand-off to the end of the turn
  keeps a Pair alive while later events of the same epoll batch may still name it.

Counting: ``bytes a->b`` is what the destination socket accepted (splice out of the
pipe), so bytes still in a pipe when a pair is reset are not counted.
"""

from libc.errno cimport EAGAIN, ECONNRESET, EINTR, EPIPE, errno
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc

from socks6fast.includes.linux cimport (
    CLOCK_MONOTONIC_COARSE,
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    EPOLL_CLOEXEC,
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EPOLLERR,
    EPOLLET,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
    F_GETFL,
    F_GETPIPE_SZ,
    F_SETFL,
    F_SETPIPE_SZ,
    O_CLOEXEC,
    O_NONBLOCK,
    SHUT_WR,
    SIG_SETMASK,
    SO_ERROR,
    SO_LINGER,
    SOL_SOCKET,
    SPLICE_F_MOVE,
    SPLICE_F_NONBLOCK,
    clock_gettime,
    close,
    epoll_create1,
    epoll_ctl,
    epoll_event,
    epoll_wait,
    eventfd,
    fcntl,
    getsockopt,
    linger,
    pipe2,
    pthread_create,
    pthread_join,
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_t,
    pthread_mutex_unlock,
    pthread_self,
    pthread_setname_np,
    pthread_sigmask,
    pthread_t,
    read,
    s6_add,
    s6_load,
    setsockopt,
    shutdown,
    sigfillset,
    sigset_t,
    socklen_t,
    splice,
    timespec,
    write,
)

import os

from socks6fast.constants import MAX_RELAY_WORKERS, RelayEnd

# RelayEnd values as C constants (the IntEnum in constants.py is the one definition;
# test_relay.py checks these agree).
cdef enum:
    END_EOF = 0
    END_RESET = 1
    END_IDLE = 2
    END_ERROR = 3
    END_SHUTDOWN = 4
    END_LIVE = -1

cdef enum:
    MAX_EVENTS = 256        # epoll_wait batch
    POOL_MAX = 32           # empty pipes a worker keeps for reuse
    MIN_PIPE_SIZE = 65536   # the kernel's default pipe size: never ask for less

# Flags of every splice() call. No SPLICE_F_MORE (see Strategy).
cdef unsigned int SPLICE_FLAGS = SPLICE_F_NONBLOCK | SPLICE_F_MOVE


cdef struct PipeBuf:
    int r           # read end, -1 when the direction holds no pipe
    int w           # write end
    int cap         # capacity in bytes (F_GETPIPE_SZ)


cdef struct Dir:
    PipeBuf pipe
    size_t in_pipe  # bytes spliced into the pipe and not yet out of it
    uint64_t nbytes # bytes the destination socket accepted
    bint eof        # the source said EOF (splice returned 0)
    bint done       # EOF forwarded: pipe drained and destination shut down for writing


cdef struct Pair  # forward declaration: Side points back to its Pair


cdef struct Side:
    Pair* pair
    int fd
    bint readable   # edge-triggered readiness, cleared on EAGAIN
    bint writable


cdef struct Worker  # forward declaration


cdef struct Pair:
    Side side[2]    # side[0] is fd_a, side[1] is fd_b
    Dir dir[2]      # dir[0] moves a -> b, dir[1] moves b -> a
    int64_t ident
    int64_t last_ms # last time bytes moved (CLOCK_MONOTONIC_COARSE, ms)
    int reason      # END_LIVE while relaying, then a RelayEnd value
    bint in_ready
    bint registered # both fds are in the worker's epoll set
    Pair* lru_prev  # worker-local activity list (oldest first)
    Pair* lru_next
    Pair* ready_prev
    Pair* ready_next
    Pair* next      # inbox, ended and done lists (one at a time)
    Worker* worker


cdef struct Engine:
    Worker* workers
    int nworkers
    int rr                  # round-robin start for ties (Python thread only)
    int donefd              # eventfd the asyncio loop watches
    pthread_mutex_t lock    # guards done_head/done_tail/active
    Pair* done_head
    Pair* done_tail
    int active
    int64_t idle_ms         # 0 = no idle timeout
    int pipe_size
    size_t budget           # bytes per direction per turn before yielding to other pairs


cdef struct Worker:
    Engine* engine
    pthread_t thread
    bint started
    int epfd
    int wakefd
    pthread_mutex_t lock    # guards inbox, cancels, stop
    Pair* inbox
    int64_t* cancels
    size_t ncancels
    size_t cancels_cap
    bint stop
    int load                # pairs owned (inbox + live); atomic, read by add()
    # Everything below is touched by the worker thread only.
    Pair* lru_head
    Pair* lru_tail
    Pair* ready_head
    Pair* ready_tail
    Pair* ended
    int nended
    PipeBuf pool[POOL_MAX]
    int npool
    int pipe_want           # F_SETPIPE_SZ request that last worked
    int64_t now_ms


# ---------------------------------------------------------------------------
# Small helpers (worker thread, no GIL)

cdef inline int64_t monotonic_ms() noexcept nogil:
    cdef timespec ts
    # CLOCK_MONOTONIC_COARSE is a vDSO read (no syscall); its few-ms granularity is
    # plenty for idle timeouts.
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline void wake_fd(int fd) noexcept nogil:
    cdef uint64_t one = 1
    # An eventfd write only fails with EAGAIN once the counter nears 2**64 - 1, and
    # then the reader is already woken; nothing to retry.
    write(fd, &one, sizeof(one))


cdef inline void clear_fd(int fd) noexcept nogil:
    cdef uint64_t value
    # Reading an eventfd resets its counter; EAGAIN (already zero) is fine.
    read(fd, &value, sizeof(value))


cdef int pipe_get(Worker* w, Dir* d) noexcept nogil:
    """Give direction d a pipe (from the pool or new). Returns 0, or -1 with errno set."""
    cdef int fds[2]
    cdef int cap
    if d.pipe.r >= 0:
        return 0
    if w.npool > 0:
        w.npool -= 1
        d.pipe = w.pool[w.npool]
        return 0
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        return -1
    # Grow the pipe; the kernel refuses sizes above /proc/sys/fs/pipe-max-size or the
    # per-user quota with EPERM (or EINVAL/ENOMEM): halve down to the default size and
    # remember the size that worked for the next pipe.
    cap = -1
    while w.pipe_want > MIN_PIPE_SIZE:
        cap = fcntl(fds[1], F_SETPIPE_SZ, w.pipe_want)
        if cap >= 0:
            break
        w.pipe_want //= 2
    if cap < 0:
        cap = fcntl(fds[1], F_GETPIPE_SZ)
        if cap <= 0:
            cap = MIN_PIPE_SIZE
    d.pipe.r = fds[0]
    d.pipe.w = fds[1]
    d.pipe.cap = cap
    return 0


cdef void pipe_put(Worker* w, Dir* d) noexcept nogil:
    """Take direction d's pipe back: to the pool when empty, else close it (its bytes are lost)."""
    if d.pipe.r < 0:
        return
    if d.in_pipe == 0 and w.npool < POOL_MAX:
        w.pool[w.npool] = d.pipe
        w.npool += 1
    else:
        close(d.pipe.r)
        close(d.pipe.w)
    d.pipe.r = -1
    d.pipe.w = -1
    d.pipe.cap = 0
    d.in_pipe = 0


cdef void ready_push(Worker* w, Pair* p) noexcept nogil:
    if p.in_ready:
        return
    p.in_ready = True
    p.ready_next = NULL
    p.ready_prev = w.ready_tail
    if w.ready_tail != NULL:
        w.ready_tail.ready_next = p
    else:
        w.ready_head = p
    w.ready_tail = p


cdef void ready_remove(Worker* w, Pair* p) noexcept nogil:
    if not p.in_ready:
        return
    p.in_ready = False
    if p.ready_prev != NULL:
        p.ready_prev.ready_next = p.ready_next
    else:
        w.ready_head = p.ready_next
    if p.ready_next != NULL:
        p.ready_next.ready_prev = p.ready_prev
    else:
        w.ready_tail = p.ready_prev
    p.ready_prev = NULL
    p.ready_next = NULL


cdef void lru_remove(Worker* w, Pair* p) noexcept nogil:
    if p.lru_prev != NULL:
        p.lru_prev.lru_next = p.lru_next
    else:
        w.lru_head = p.lru_next
    if p.lru_next != NULL:
        p.lru_next.lru_prev = p.lru_prev
    else:
        w.lru_tail = p.lru_prev
    p.lru_prev = NULL
    p.lru_next = NULL


cdef void lru_append(Worker* w, Pair* p) noexcept nogil:
    p.lru_next = NULL
    p.lru_prev = w.lru_tail
    if w.lru_tail != NULL:
        w.lru_tail.lru_next = p
    else:
        w.lru_head = p
    w.lru_tail = p


cdef inline void touch(Worker* w, Pair* p) noexcept nogil:
    """Bytes moved: the pair becomes the most recently active one."""
    p.last_ms = w.now_ms
    if w.lru_tail != p:
        lru_remove(w, p)
        lru_append(w, p)


cdef void set_reset_on_close(int fd) noexcept nogil:
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    # Linger 0: close() sends RST instead of FIN. Errors (fd already dead) don't matter.
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))


cdef void end_pair(Worker* w, Pair* p, int reason) noexcept nogil:
    """Finish a pair: unregister, close both sockets and its pipes, queue the report."""
    cdef int i
    if p.reason != END_LIVE:
        return
    p.reason = reason
    ready_remove(w, p)
    lru_remove(w, p)
    for i in range(2):
        if p.registered:
            # Explicit removal: close() alone would keep the registration alive if
            # another process or descriptor still refers to the same socket, and a
            # later event would then carry a pointer to a freed Pair.
            epoll_ctl(w.epfd, EPOLL_CTL_DEL, p.side[i].fd, NULL)
        if reason == END_RESET or reason == END_ERROR:
            set_reset_on_close(p.side[i].fd)
        close(p.side[i].fd)
        p.side[i].fd = -1
        pipe_put(w, &p.dir[i])
    p.registered = False
    p.next = w.ended
    w.ended = p
    w.nended += 1


cdef inline int error_reason(int err) noexcept nogil:
    if err == ECONNRESET or err == EPIPE:
        return END_RESET
    return END_ERROR


# ---------------------------------------------------------------------------
# The pump: one direction of one pair

cdef int pump(Worker* w, Pair* p, int d) noexcept nogil:
    """Move bytes of direction d until blocked or out of budget.

    Returns 0 when nothing more can move until the next event, 1 when the budget
    ran out with work left, -1 when the pair ended.
    """
    cdef Dir* dr = &p.dir[d]
    cdef Side* src = &p.side[d]
    cdef Side* dst = &p.side[1 - d]
    cdef Dir* other = &p.dir[1 - d]
    cdef size_t moved = 0
    cdef bint active = False
    cdef ssize_t n
    cdef bint progressed
    if dr.done:
        return 0
    while True:
        progressed = False
        # 1. Pipe -> destination socket.
        if dr.in_pipe > 0 and dst.writable:
            n = splice(dr.pipe.r, NULL, dst.fd, NULL, dr.in_pipe, SPLICE_FLAGS)
            if n > 0:
                dr.in_pipe -= <size_t>n
                dr.nbytes += <uint64_t>n
                moved += <size_t>n
                active = True
                progressed = True
            elif n < 0:
                if errno == EINTR:
                    # Interrupted before moving anything: just retry.
                    continue
                if errno == EAGAIN:
                    # Socket send buffer full; EPOLLOUT will say when to go on.
                    dst.writable = False
                else:
                    end_pair(w, p, error_reason(errno))
                    return -1
        # 2. Pipe empty: return it to the pool; forward a pending EOF.
        if dr.in_pipe == 0:
            pipe_put(w, dr)
            if dr.eof:
                # Half-close: the source is done and everything reached the destination.
                # shutdown() can fail with ENOTCONN if the destination was reset meanwhile;
                # the other direction reports that reset, so the error is ignored here.
                shutdown(dst.fd, SHUT_WR)
                dr.done = True
                if active:
                    touch(w, p)
                if other.done:
                    end_pair(w, p, END_EOF)
                    return -1
                return 0
        # 3. Source socket -> pipe, while the pipe has room.
        if not dr.eof and src.readable and (dr.pipe.r < 0 or dr.in_pipe < <size_t>dr.pipe.cap):
            if pipe_get(w, dr) < 0:
                # No pipe (EMFILE/ENFILE/ENOMEM): the pair cannot be relayed.
                end_pair(w, p, END_ERROR)
                return -1
            n = splice(src.fd, NULL, dr.pipe.w, NULL, <size_t>dr.pipe.cap - dr.in_pipe, SPLICE_FLAGS)
            if n > 0:
                dr.in_pipe += <size_t>n
                active = True
                progressed = True
            elif n == 0:
                dr.eof = True
                progressed = True
            elif errno == EINTR:
                # Interrupted before moving anything: just retry.
                continue
            elif errno == EAGAIN:
                # EAGAIN means "socket empty" or "pipe full": the pipe counts slots, not
                # bytes, so it can be full below cap. Only an empty pipe proves the
                # socket is empty; otherwise keep the flag and retry once the pipe has
                # drained a little (step 1 made progress).
                if dr.in_pipe == 0:
                    src.readable = False
                    pipe_put(w, dr)
            else:
                end_pair(w, p, error_reason(errno))
                return -1
        if not progressed:
            if active:
                touch(w, p)
            return 0
        if moved >= w.engine.budget:
            touch(w, p)
            return 1


cdef void run_pair(Worker* w, Pair* p) noexcept nogil:
    """Pump both directions once; keep the pair on the ready list only if work is left."""
    cdef int r0
    cdef int r1
    r0 = pump(w, p, 0)
    if r0 < 0:
        return
    r1 = pump(w, p, 1)
    if r1 < 0:
        return
    if r0 == 1 or r1 == 1:
        # Out of budget: back of the queue, so every ready pair gets a turn first.
        ready_remove(w, p)
        ready_push(w, p)
    else:
        ready_remove(w, p)


# ---------------------------------------------------------------------------
# The worker thread

cdef int cmp_int64(const void* a, const void* b) noexcept nogil:
    # qsort hands us pointers into the int64_t array: cast back to read the values.
    cdef int64_t x = (<const int64_t*>a)[0]
    cdef int64_t y = (<const int64_t*>b)[0]
    return (x > y) - (x < y)


cdef bint sorted_contains(const int64_t* items, size_t n, int64_t key) noexcept nogil:
    cdef size_t lo = 0
    cdef size_t hi = n
    cdef size_t mid
    while lo < hi:
        mid = (lo + hi) // 2
        if items[mid] < key:
            lo = mid + 1
        elif items[mid] > key:
            hi = mid
        else:
            return True
    return False


cdef bint register_pair(Worker* w, Pair* p) noexcept nogil:
    cdef epoll_event ev
    cdef int i
    for i in range(2):
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        # The event carries a pointer to the Side (void* in the epoll union).
        ev.data.ptr = <void*>&p.side[i]
        if epoll_ctl(w.epfd, EPOLL_CTL_ADD, p.side[i].fd, &ev) < 0:
            if i == 1:
                epoll_ctl(w.epfd, EPOLL_CTL_DEL, p.side[0].fd, NULL)
            return False
    p.registered = True
    return True


cdef bint take_control(Worker* w) noexcept nogil:
    """Adopt new pairs and apply cancellations. Returns True when asked to stop."""
    cdef Pair* inbox
    cdef Pair* p
    cdef Pair* nxt
    cdef int64_t* cancels
    cdef size_t ncancels
    cdef bint stop
    clear_fd(w.wakefd)
    pthread_mutex_lock(&w.lock)
    inbox = w.inbox
    w.inbox = NULL
    cancels = w.cancels
    ncancels = w.ncancels
    w.cancels = NULL
    w.ncancels = 0
    w.cancels_cap = 0
    stop = w.stop
    pthread_mutex_unlock(&w.lock)
    p = inbox
    while p != NULL:
        nxt = p.next
        p.next = NULL
        p.last_ms = w.now_ms
        lru_append(w, p)
        if register_pair(w, p):
            # Data may already wait on either socket (no edge would report it): start
            # with every flag set and let the first splice() calls find out.
            ready_push(w, p)
        else:
            end_pair(w, p, END_ERROR)
        p = nxt
    if ncancels:
        qsort(cancels, ncancels, sizeof(int64_t), cmp_int64)
        p = w.lru_head
        while p != NULL:
            nxt = p.lru_next
            if sorted_contains(cancels, ncancels, p.ident):
                end_pair(w, p, END_SHUTDOWN)
            p = nxt
    free(cancels)
    return stop


cdef void flush_ended(Worker* w) noexcept nogil:
    """Move this turn's ended pairs to the engine's done list and wake the asyncio loop."""
    cdef Engine* e = w.engine
    cdef Pair* p
    cdef Pair* nxt
    cdef int count = w.nended
    if w.ended == NULL:
        return
    pthread_mutex_lock(&e.lock)
    p = w.ended
    while p != NULL:
        nxt = p.next
        p.next = NULL
        if e.done_tail != NULL:
            e.done_tail.next = p
        else:
            e.done_head = p
        e.done_tail = p
        p = nxt
    e.active -= count
    pthread_mutex_unlock(&e.lock)
    s6_add(&w.load, -count)
    w.ended = NULL
    w.nended = 0
    wake_fd(e.donefd)


cdef void expire_idle(Worker* w) noexcept nogil:
    cdef int64_t idle_ms = w.engine.idle_ms
    if idle_ms <= 0:
        return
    # The list is ordered by last activity: stop at the first pair still fresh.
    while w.lru_head != NULL and w.lru_head.last_ms + idle_ms <= w.now_ms:
        end_pair(w, w.lru_head, END_IDLE)


cdef int wait_timeout(Worker* w) noexcept nogil:
    cdef int64_t left
    if w.ready_head != NULL:
        return 0
    if w.engine.idle_ms <= 0 or w.lru_head == NULL:
        return -1
    left = w.lru_head.last_ms + w.engine.idle_ms - monotonic_ms()
    if left < 0:
        return 0
    # +1: the coarse clock may still read the old tick when we wake exactly on time.
    return <int>(left + 1) if left < 3600000 else 3600000


cdef void* worker_main(void* arg) noexcept nogil:
    # pthread start routine: arg is the Worker* given to pthread_create.
    cdef Worker* w = <Worker*>arg
    cdef epoll_event events[MAX_EVENTS]
    cdef int n
    cdef int i
    cdef int k
    cdef int nready
    cdef Side* side
    cdef Pair* p
    cdef int err
    cdef socklen_t errlen
    cdef bint stop = False
    # Visible in top -H, perf and /proc/<pid>/task/*/comm (15 chars max).
    pthread_setname_np(pthread_self(), b"socks6fast-rly")
    w.now_ms = monotonic_ms()
    while not stop:
        n = epoll_wait(w.epfd, events, MAX_EVENTS, wait_timeout(w))
        w.now_ms = monotonic_ms()
        if n < 0:
            if errno == EINTR:
                # Interrupted by a signal (all signals are blocked here, but a debugger
                # or ptrace can still do it): wait again.
                continue
            # EBADF/EINVAL: our own epoll fd is broken; nothing can be relayed any more.
            break
        for i in range(n):
            if events[i].data.ptr == NULL:
                # The wake eventfd: new pairs, cancellations or stop.
                stop = take_control(w)
                continue
            # The data pointer is the Side registered in register_pair().
            side = <Side*>events[i].data.ptr
            p = side.pair
            if p.reason != END_LIVE:
                # Ended earlier in this batch; the struct lives until flush_ended().
                continue
            if events[i].events & EPOLLERR:
                err = 0
                errlen = sizeof(err)
                getsockopt(side.fd, SOL_SOCKET, SO_ERROR, &err, &errlen)
                if err != 0:
                    end_pair(w, p, error_reason(err))
                    continue
            if events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                side.readable = True
            if events[i].events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
                side.writable = True
            ready_push(w, p)
        # One turn for every pair that was ready when the turn started.
        nready = 0
        p = w.ready_head
        while p != NULL:
            nready += 1
            p = p.ready_next
        for k in range(nready):
            p = w.ready_head
            if p == NULL:
                break
            run_pair(w, p)
        expire_idle(w)
        flush_ended(w)
    # Stop (or a broken epoll set): refuse new pairs from now on (add() checks the flag
    # under the lock), adopt what is still in the inbox, end everything.
    pthread_mutex_lock(&w.lock)
    w.stop = True
    pthread_mutex_unlock(&w.lock)
    take_control(w)
    while w.lru_head != NULL:
        end_pair(w, w.lru_head, END_SHUTDOWN if stop else END_ERROR)
    flush_ended(w)
    return NULL


# ---------------------------------------------------------------------------
# Engine set-up and tear-down

cdef void stop_workers(Engine* e) noexcept nogil:
    """Ask every started worker to stop and wait for it; each ends its pairs first."""
    cdef int i
    cdef Worker* w
    for i in range(e.nworkers):
        w = &e.workers[i]
        if w.started:
            pthread_mutex_lock(&w.lock)
            w.stop = True
            pthread_mutex_unlock(&w.lock)
            wake_fd(w.wakefd)
    for i in range(e.nworkers):
        w = &e.workers[i]
        if w.started:
            pthread_join(w.thread, NULL)
            w.started = False


cdef void release_workers(Engine* e) noexcept nogil:
    """Close every worker fd and pooled pipe (workers must be stopped)."""
    cdef int i
    cdef int j
    cdef Worker* w
    cdef Pair* p
    cdef Pair* nxt
    for i in range(e.nworkers):
        w = &e.workers[i]
        # A worker that never started may still hold pairs in its inbox (add() raced a
        # failed start): close them like a shutdown would, then report them.
        p = w.inbox
        w.inbox = NULL
        while p != NULL:
            nxt = p.next
            close(p.side[0].fd)
            close(p.side[1].fd)
            p.side[0].fd = -1
            p.side[1].fd = -1
            p.reason = END_SHUTDOWN
            p.next = w.ended
            w.ended = p
            w.nended += 1
            p = nxt
        flush_ended(w)
        for j in range(w.npool):
            close(w.pool[j].r)
            close(w.pool[j].w)
        w.npool = 0
        free(w.cancels)
        w.cancels = NULL
        w.ncancels = 0
        w.cancels_cap = 0
        if w.epfd >= 0:
            close(w.epfd)
            w.epfd = -1
        if w.wakefd >= 0:
            close(w.wakefd)
            w.wakefd = -1
        pthread_mutex_destroy(&w.lock)
    free(e.workers)
    e.workers = NULL
    e.nworkers = 0


cdef int start_engine(Engine* e, int nworkers) noexcept nogil:
    """Create the workers' fds and threads. Returns 0, or an errno value (e is left for release)."""
    cdef int i
    cdef int rc
    cdef Worker* w
    cdef epoll_event ev
    cdef sigset_t all_signals
    cdef sigset_t old_mask
    # calloc: every field starts at 0/NULL; fds are set to -1 right below.
    e.workers = <Worker*>calloc(<size_t>nworkers, sizeof(Worker))
    if e.workers == NULL:
        return errno
    e.nworkers = nworkers
    for i in range(nworkers):
        w = &e.workers[i]
        w.engine = e
        w.epfd = -1
        w.wakefd = -1
        w.pipe_want = e.pipe_size
        pthread_mutex_init(&w.lock, NULL)
    for i in range(nworkers):
        w = &e.workers[i]
        w.epfd = epoll_create1(EPOLL_CLOEXEC)
        if w.epfd < 0:
            return errno
        w.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if w.wakefd < 0:
            return errno
        # Level-triggered, data.ptr NULL marks the wake eventfd among the Side pointers.
        ev.events = EPOLLIN
        ev.data.ptr = NULL
        if epoll_ctl(w.epfd, EPOLL_CTL_ADD, w.wakefd, &ev) < 0:
            return errno
    # Workers start with every signal blocked (a thread inherits its creator's mask), so
    # signals keep going to the Python main thread and never interrupt a worker.
    sigfillset(&all_signals)
    pthread_sigmask(SIG_SETMASK, &all_signals, &old_mask)
    rc = 0
    for i in range(nworkers):
        w = &e.workers[i]
        # worker_main gets its Worker* through the void* argument.
        rc = pthread_create(&w.thread, NULL, worker_main, <void*>w)
        if rc != 0:
            break
        w.started = True
    pthread_sigmask(SIG_SETMASK, &old_mask, NULL)
    return rc


cdef void free_done(Engine* e) noexcept nogil:
    cdef Pair* p = e.done_head
    cdef Pair* nxt
    while p != NULL:
        nxt = p.next
        free(p)
        p = nxt
    e.done_head = NULL
    e.done_tail = NULL


_END_MEMBERS = tuple(sorted(RelayEnd, key=int))


cdef class RelayEngine:
    """A pool of C worker threads relaying pairs of connected stream sockets with splice(2).

    Args:
        workers: worker threads; 0 means one per CPU this process may run on.
        idle_timeout: seconds without a byte moving in either direction after which a
            pair ends with ``RelayEnd.IDLE_TIMEOUT``; 0 disables it.
        pipe_size: requested capacity of each relay pipe (F_SETPIPE_SZ); the kernel's
            limits may make it smaller (never below the 64 KiB default).

    Raises:
        ValueError: an argument is out of range.
        OSError: the kernel refused an epoll set, an eventfd or a thread.
    """

    cdef Engine* _eng
    cdef bint _closed
    cdef dict _routes  # ident -> worker index, from add() until drain() reports the pair

    def __cinit__(self) -> None:
        self._eng = NULL
        self._closed = True
        self._routes = {}

    def __init__(self, int workers=0, double idle_timeout=0.0, int pipe_size=1 << 20) -> None:
        cdef int rc
        cdef int nworkers
        if self._eng != NULL:
            raise RuntimeError("RelayEngine is already initialised")
        # The one limit (constants.MAX_RELAY_WORKERS), also what config.py accepts.
        if workers < 0 or workers > MAX_RELAY_WORKERS:
            raise ValueError(f"workers must be in 0..{MAX_RELAY_WORKERS}, got {workers}")
        if not (0.0 <= idle_timeout < 1e9):
            raise ValueError(f"idle_timeout must be >= 0 seconds, got {idle_timeout}")
        if pipe_size < 4096 or pipe_size > (1 << 30):
            raise ValueError(f"pipe_size must be in 4096..2**30, got {pipe_size}")
        nworkers = workers or max(1, min(MAX_RELAY_WORKERS, len(os.sched_getaffinity(0))))
        # calloc: lists empty, counters zero.
        self._eng = <Engine*>calloc(1, sizeof(Engine))
        if self._eng == NULL:
            raise MemoryError()
        self._eng.donefd = -1
        self._eng.idle_ms = <int64_t>(idle_timeout * 1000.0 + 0.5) if idle_timeout > 0 else 0
        if idle_timeout > 0 and self._eng.idle_ms == 0:
            self._eng.idle_ms = 1
        self._eng.pipe_size = max(pipe_size, MIN_PIPE_SIZE)
        self._eng.budget = <size_t>max(2 * self._eng.pipe_size, 1 << 18)
        pthread_mutex_init(&self._eng.lock, NULL)
        self._eng.donefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self._eng.donefd < 0:
            rc = errno
            self._teardown()
            raise OSError(rc, os.strerror(rc))
        # Thread creation runs without the GIL: nothing in it touches Python objects.
        with nogil:
            rc = start_engine(self._eng, nworkers)
        if rc != 0:
            self._teardown()
            raise OSError(rc, os.strerror(rc))
        self._closed = False

    cdef void _teardown(self) noexcept:
        """Stop workers and close every fd; the struct stays for drain() until dealloc."""
        cdef Engine* e = self._eng
        self._closed = True
        if e == NULL:
            return
        # Joining waits for the workers to end their pairs; they never need the GIL, so
        # release it (other Python threads run meanwhile, the asyncio loop included).
        with nogil:
            stop_workers(e)
            release_workers(e)
        if e.donefd >= 0:
            close(e.donefd)
            e.donefd = -1

    def __dealloc__(self) -> None:
        if self._eng == NULL:
            return
        if not self._closed:
            self._teardown()
        free_done(self._eng)
        pthread_mutex_destroy(&self._eng.lock)
        free(self._eng)
        self._eng = NULL

    def fileno(self) -> int:
        """The eventfd that is readable while finished pairs wait for :meth:`drain`.

        Watch it with ``loop.add_reader(engine.fileno(), ...)``; stop watching before
        :meth:`close`, which closes it.

        Raises:
            ValueError: the engine is closed.
        """
        if self._closed:
            raise ValueError("RelayEngine is closed")
        return self._eng.donefd

    @property
    def active(self) -> int:
        """Pairs added and not yet finished (finished ones may still wait in drain())."""
        cdef int n
        if self._eng == NULL:
            return 0
        pthread_mutex_lock(&self._eng.lock)
        n = self._eng.active
        pthread_mutex_unlock(&self._eng.lock)
        return n

    @property
    def workers(self) -> int:
        """Number of worker threads (0 once closed)."""
        return 0 if self._closed else self._eng.nworkers

    def add(self, int fd_a, int fd_b, ident) -> None:
        """Relay between two connected stream sockets until both directions end.

        Both fds are switched to non-blocking mode and owned by the engine from a
        successful return on: it closes them when the pair ends. The pair is reported
        by :meth:`drain` as ``(ident, bytes a->b, bytes b->a, RelayEnd)``.

        Args:
            fd_a: one socket (the server puts the client leg here).
            fd_b: the other socket (the remote leg).
            ident: caller's key for this pair, unique among pairs not yet drained,
                in the signed 64-bit range.

        Raises:
            ValueError: the engine is closed, the fds are invalid/equal or ident is in use.
            OSError: an fd could not be made non-blocking (then the caller still owns both).
        """
        cdef int64_t c_ident = ident
        cdef int idx
        cdef int i
        cdef int best
        cdef int load
        cdef int flags
        cdef Engine* e = self._eng
        cdef Worker* w
        cdef Pair* p
        cdef int fds[2]
        if self._closed:
            raise ValueError("RelayEngine is closed")
        if fd_a < 0 or fd_b < 0 or fd_a == fd_b:
            raise ValueError(f"need two distinct open fds, got {fd_a} and {fd_b}")
        if ident in self._routes:
            raise ValueError(f"ident {ident} is already relayed")
        fds[0] = fd_a
        fds[1] = fd_b
        for i in range(2):
            flags = fcntl(fds[i], F_GETFL)
            if flags < 0:
                raise OSError(errno, os.strerror(errno))
            # The server's sockets are non-blocking already: one syscall, not two.
            if not (flags & O_NONBLOCK) and fcntl(fds[i], F_SETFL, flags | O_NONBLOCK) < 0:
                raise OSError(errno, os.strerror(errno))
        # calloc: list pointers NULL, counters 0, flags False.
        p = <Pair*>calloc(1, sizeof(Pair))
        if p == NULL:
            raise MemoryError()
        p.ident = c_ident
        p.reason = END_LIVE
        for i in range(2):
            p.side[i].pair = p
            p.side[i].fd = fds[i]
            p.side[i].readable = True
            p.side[i].writable = True
            p.dir[i].pipe.r = -1
            p.dir[i].pipe.w = -1
        # Least-loaded worker; the scan starts at a rotating index so ties spread out.
        best = -1
        load = 0
        for i in range(e.nworkers):
            idx = (e.rr + i) % e.nworkers
            if best < 0 or s6_load(&e.workers[idx].load) < load:
                best = idx
                load = s6_load(&e.workers[idx].load)
        e.rr = (e.rr + 1) % e.nworkers
        w = &e.workers[best]
        p.worker = w
        # Count the pair before the worker can see (and possibly finish) it.
        pthread_mutex_lock(&e.lock)
        e.active += 1
        pthread_mutex_unlock(&e.lock)
        s6_add(&w.load, 1)
        # The worker holds this lock only to swap lists, so taking it with the GIL held
        # cannot deadlock (workers never take the GIL).
        pthread_mutex_lock(&w.lock)
        if w.stop:
            pthread_mutex_unlock(&w.lock)
            pthread_mutex_lock(&e.lock)
            e.active -= 1
            pthread_mutex_unlock(&e.lock)
            s6_add(&w.load, -1)
            free(p)
            raise OSError(5, "relay worker stopped")  # EIO: the worker's epoll set failed
        p.next = w.inbox
        w.inbox = p
        pthread_mutex_unlock(&w.lock)
        wake_fd(w.wakefd)
        self._routes[ident] = best

    def cancel(self, ident) -> None:
        """End one pair now, with reason ``RelayEnd.SHUTDOWN``; both sockets are closed.

        The pair is still reported by :meth:`drain`. Unknown or already-drained idents
        are ignored, so cancelling is always safe.
        """
        cdef object idx = self._routes.get(ident)
        cdef Worker* w
        cdef int64_t* grown
        cdef size_t cap
        if idx is None or self._closed:
            return
        w = &self._eng.workers[<int>idx]
        pthread_mutex_lock(&w.lock)
        if w.ncancels == w.cancels_cap:
            cap = w.cancels_cap * 2 if w.cancels_cap else 16
            # realloc returns void*: the buffer holds int64_t idents.
            grown = <int64_t*>realloc(w.cancels, cap * sizeof(int64_t))
            if grown == NULL:
                pthread_mutex_unlock(&w.lock)
                raise MemoryError()
            w.cancels = grown
            w.cancels_cap = cap
        w.cancels[w.ncancels] = <int64_t>ident
        w.ncancels += 1
        pthread_mutex_unlock(&w.lock)
        wake_fd(w.wakefd)

    def drain(self) -> list:
        """Collect the pairs that ended since the last call.

        Returns:
            A list of ``(ident, bytes_a_to_b, bytes_b_to_a, RelayEnd)`` tuples. Works
            after :meth:`close` too (it reports the pairs close() ended).
        """
        cdef Pair* head
        cdef Pair* p
        cdef list out = []
        if self._eng == NULL:
            return out
        # Reset the eventfd before taking the list: a pair finished after this read
        # writes it again, so the loop can never sleep on a non-empty list.
        if self._eng.donefd >= 0:
            clear_fd(self._eng.donefd)
        pthread_mutex_lock(&self._eng.lock)
        head = self._eng.done_head
        self._eng.done_head = NULL
        self._eng.done_tail = NULL
        pthread_mutex_unlock(&self._eng.lock)
        try:
            p = head
            while p != NULL:
                out.append((p.ident, p.dir[0].nbytes, p.dir[1].nbytes, _END_MEMBERS[p.reason]))
                self._routes.pop(p.ident, None)
                p = p.next
        finally:
            # Free every struct even if building the list failed (MemoryError).
            while head != NULL:
                p = head.next
                free(head)
                head = p
        return out

    def close(self) -> None:
        """Stop the workers, end every pair (``RelayEnd.SHUTDOWN``) and close all fds.

        Blocks until the workers have exited (milliseconds). Idempotent. The ended pairs
        remain available through :meth:`drain`.
        """
        if not self._closed:
            self._teardown()

    def __enter__(self) -> RelayEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
