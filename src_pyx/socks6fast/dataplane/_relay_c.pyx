# cython: language_level=3
"""The TCP data plane: a splice(2) relay running in C worker threads, outside the GIL.

Once a CONNECT or BIND succeeded, the control plane hands both sockets of the
connection to a :class:`RelayEngine` and forgets them. Python API::

    engine = RelayEngine(workers=0, idle_timeout=0.0, pipe_size=1 << 20, max_pipes=0, pipe_budget=0)
    engine.fileno() -> int        # readable (level) while finished pairs wait in drain()
    engine.add(fd_a, fd_b, ident, up=(), down=())  # takes ownership of both fds; closes
                                  # them when the pair ends; up/down: TokenBucket limits
    engine.cancel(ident)          # end one pair now (reason SHUTDOWN); no-op if already ended
    engine.drain() -> list[tuple[ident, bytes_a_to_b, bytes_b_to_a, RelayEnd]]
    engine.active -> int          # pairs added and not yet finished
    engine.live_workers -> int    # workers still taking pairs (dead ones left the rotation)
    engine.dead_workers() -> list[tuple[index, errno]]  # workers whose epoll_wait failed
    engine.max_pipes = n          # pipes the engine may hold at once (0: no cap); settable any time
    engine.pipes, engine.pipe_bytes, engine.copied, engine.pipe_errors   # counters, see below
    engine.close()                # stop the workers, close every pair (SHUTDOWN) and own fds

Strategy:

* N worker threads (default: one per usable core), each with its own epoll set.
  ``add()`` picks the least-loaded worker (ties: round robin), appends the pair to
  that worker's mutex-protected inbox and wakes it through its eventfd. The worker
  registers both sockets once, edge-triggered, for EPOLLIN | EPOLLPRI | EPOLLOUT |
  EPOLLRDHUP; it never calls epoll_ctl again until the pair ends. The worker count is
  capped by ``constants.MAX_RELAY_WORKERS``, the one limit config.py checks too.
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
* Pipe budget (issue 16 defect 4): pipes are grown with F_SETPIPE_SZ to ``pipe_size``
  while their total capacity (``pipe_bytes``, every pipe in use or pooled) stays within
  ``pipe_budget``, which the caller derives from the user's pipe quota
  (/proc/sys/fs/pipe-user-pages-soft; above it the kernel refuses to grow pipes and
  gives new ones 8 KiB). Near the budget a new pipe is smaller (halved down to the
  64 KiB default), a pipe taken from the pool is grown back when there is room, and
  the pool keeps at most a quarter of the budget idle. When the kernel still refuses a
  size, the worker halves its request and tries the full size again after
  PIPE_RETRY_MS: a burst never shrinks later pipes for good.
* No pipe to be had (issue 12 defect 3): when ``max_pipes`` pipes exist, the budget
  has no room for even a default pipe, or pipe2() fails (EMFILE/ENFILE, ENOMEM), the
  direction copies instead (copy_step): recv(MSG_PEEK) into the worker's 64 KiB buffer,
  send() to the destination, then consume exactly what the destination accepted, so
  unsent bytes stay queued in the source socket and no per-pair buffer is needed.
  Slower (two copies through user space) but a relay is never cut for lack of a
  descriptor; the next step tries a pipe again. Failures are handled as on the splice
  path (mark_failed, fail_side). A peek never stops at an urgent mark (a read at the
  mark skips the urgent byte), so sockatmark() is asked after every peek: at the mark
  the peeked bytes are not sent, and forward_urgent forwards the urgent byte; it then
  steps over the mark by peeking too (urgent_step_without_pipe), so nothing is consumed
  that did not reach the destination. ``copied`` counts those bytes, ``pipe_errors``
  the pipe2() failures.
* Bandwidth limits (issue 14 item 4, D26): ``add()`` may give each direction up to two
  ``TokenBucket`` objects (the user's and the client address's), C structs shared by every
  pair of that user or address across workers, each behind its own mutex. Before reading
  from its source a limited direction refills its buckets (CLOCK_MONOTONIC) and caps the
  splice (or copy) at the fewest tokens; after it, the bytes read are taken from every
  bucket. Below a bucket's low mark (1/50 s of its rate, 4 KiB at least) the pair goes on
  the worker's throttle list with the time that bucket refills to it; epoll_wait's timeout
  covers the earliest, and the pair returns to the ready list then. Its readiness flags
  stay set; new bytes arriving meanwhile only bring an edge that finds it still parked, and
  they stop once the receive window is full (no busy loop). A direction without buckets
  pays one integer test per read.
* Half-close: a splice() returning 0 is the source's EOF; once that direction's
  pipe is drained, the destination gets shutdown(SHUT_WR). The pair ends (EOF) when
  both directions have finished.
* Urgent data (TCP MSG_OOB, sent by telnet and by FTP's ABOR): splice() never reads
  across an urgent mark; it answers EAGAIN there, or 0 once a FIN is queued behind
  the mark. So a 0 is taken for EOF only when sockatmark() says the source is not at a
  mark (asked at most once per direction, at its end, and not at all when the FIN's
  EPOLLRDHUP came first without EPOLLPRI), and an EAGAIN with an empty pipe asks
  sockatmark() only after EPOLLPRI flagged the socket (the normal path pays one flag
  test). At the mark, once every byte before it reached the destination, the urgent
  byte is read with recv(MSG_OOB) and sent on with send(MSG_OOB): it stays urgent, at
  the same place in the stream, as over direct TCP, so the receiver's SIGURG,
  SIOCATMARK, recv(MSG_OOB) or SO_OOBINLINE work as they would without the proxy. A
  plain recv() then steps over the mark (our sockets keep SO_OOBINLINE off, so the
  kernel skips the urgent byte) and its in-band bytes go into the empty pipe first;
  splice() goes on after them. Every in-band byte is delivered in order. The urgent
  byte counts in the byte counts. (Forwarding it beats the alternatives: dropping it
  loses the signal FTP's ABOR and telnet's Synch rely on, and inlining it adds a byte
  to the stream of a receiver that never asked for SO_OOBINLINE.)
* Failures: a socket that fails (EPOLLERR with SO_ERROR set, or an error from a
  splice() into or out of it) is marked failed (Side.err) but the pair does not end
  yet. The bytes it received before its reset are still in its receive queue (and
  in the pipe): the direction from it keeps pumping until splice() finds the queue
  empty (0 or the error), and its pipe drains into the other socket. The direction
  into it is dead: its pipe is dropped (those bytes can never be delivered, as over
  direct TCP) and its source is no longer read. Then the failure is passed on: the
  other socket is reset (SO_LINGER 0), but only once its peer has acknowledged every
  byte queued on it (SIOCOUTQ 0, polled from every 5 ms, backing off, on the worker's flush
  list, bounded by the idle timeout); a reset sent earlier would discard that tail.
  The pair ends with RESET for ECONNRESET / EPIPE, else ERROR.
* Cuts: one rule for every end. Only EOF (EOF forwarded both ways, pipes empty)
  closes with FIN. Every other end (idle timeout, cancel(), close() as at the
  server's drain deadline, a failure passed on, a dead worker) closes both
  sockets with SO_LINGER 0, so each peer sees a reset: a FIN would make a cut-off
  transfer look complete.
* Idle timeout: pairs sit in a per-worker list ordered by last activity (moved to
  the tail whenever bytes move), so expiry checks only the head and the epoll_wait
  timeout is exact.
* A worker whose epoll_wait fails for good (EBADF, EINVAL: its epoll fd was closed or
  clobbered) ends its pairs (ERROR), marks itself dead and wakes the engine eventfd.
  ``add()`` skips dead workers, so the others keep serving; the caller logs it from
  ``dead_workers()``. ``_break_worker_epoll()`` is the test hook that causes it.
* Ended pairs are unregistered, closed, and queued on the worker's local list; at
  the end of each loop turn that list moves under the engine mutex to the done
  list, and the engine eventfd is written. ``drain()`` (the asyncio thread) takes
  the done list and frees the structs. Deferring the hand-off to the end of the turn
  keeps a Pair alive while later events of the same epoll batch may still name it.

Counting: ``bytes a->b`` is what the destination socket accepted (splice out of the
pipe), so bytes still in a pipe when a pair is reset are not counted.
"""

from libc.errno cimport EAGAIN, ECONNRESET, EINTR, EIO, EPIPE, errno
from libc.math cimport ceil
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc

from socks6fast.dataplane._engine cimport (
    clear_fd,
    monotonic_ms,
    open_worker_loop,
    start_worker_thread,
    wake_fd,
)
from socks6fast.includes.linux cimport (
    CLOCK_MONOTONIC,
    CLOCK_MONOTONIC_COARSE,
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EPOLLERR,
    EPOLLET,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    EPOLLPRI,
    EPOLLRDHUP,
    F_GETFL,
    F_GETPIPE_SZ,
    F_SETFL,
    F_SETPIPE_SZ,
    MSG_DONTWAIT,
    O_CLOEXEC,
    O_NONBLOCK,
    MSG_NOSIGNAL,
    MSG_OOB,
    MSG_PEEK,
    SHUT_WR,
    SIOCOUTQ,
    SO_ERROR,
    SO_LINGER,
    SOL_SOCKET,
    SPLICE_F_MOVE,
    SPLICE_F_NONBLOCK,
    clock_gettime,
    close,
    dup3,
    epoll_ctl,
    epoll_event,
    epoll_wait,
    eventfd,
    fcntl,
    getsockopt,
    ioctl,
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
    pthread_t,
    read,
    recv,
    s6_add,
    s6_add64,
    s6_bump64,
    s6_add_fetch,
    s6_load,
    s6_load64,
    s6_store,
    send,
    setsockopt,
    shutdown,
    sockatmark,
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
    FLUSH_POLL_MS = 5       # first SIOCOUTQ check of pairs waiting to pass a reset on...
    FLUSH_POLL_MAX_MS = 200 # ...doubling while none of them moves, up to this
    URGENT_STEP = 4096      # bytes read past an urgent mark with recv() (one pipe page)
    COPY_SIZE = 65536       # the worker's buffer for copying without a pipe
    PIPE_RETRY_MS = 1000    # after the kernel refused a pipe size, try the full size again
    MAX_LIMITS = 2          # token buckets per direction: the user's and the client address's
    LOW_CHUNK = 4096        # a throttled direction waits for at least this many tokens...
    LOW_SLICES = 50         # ...or 1/50 s of its rate, whichever is more (capped by the burst)

# copy_step() outcomes.
cdef enum:
    COPY_MOVED = 0          # bytes moved
    COPY_CHANGED = 1        # no bytes, but EOF, an urgent mark or a failure was noted: look again
    COPY_BLOCKED = 2        # nothing can move until the next event
    COPY_AGAIN = 3          # the destination failed; the pair needs another turn
    COPY_STOPPED = 4        # the pair stopped relaying

# Flags of every splice() call. No SPLICE_F_MORE (see Strategy).
cdef unsigned int SPLICE_FLAGS = SPLICE_F_NONBLOCK | SPLICE_F_MOVE


cdef struct Bucket:
    # A bandwidth limit shared by every pair of one user or one client address (issue 14
    # item 4), and by their asyncio-path relays (TokenBucket.take). Workers of any thread
    # consult it, so every field is read and written under its mutex: only pairs with a
    # limit ever touch one, so unlimited pairs pay nothing.
    pthread_mutex_t lock
    double rate     # bytes per second (> 0)
    double burst    # most tokens held (bytes)
    double low      # tokens a throttled direction waits for before reading again
    double tokens   # may dip below 0 when two workers read at once: later reads wait longer
    int64_t last_ns # CLOCK_MONOTONIC of the last refill
    int refs        # the Python TokenBucket + every Pair holding it (atomic)
    uint64_t waits  # times a relay had to wait for tokens (the control plane logs them)


cdef struct PipeBuf:
    int r           # read end, -1 when the direction holds no pipe
    int w           # write end
    int cap         # capacity in bytes (F_GETPIPE_SZ)


cdef struct Dir:
    PipeBuf pipe
    size_t in_pipe  # bytes spliced into the pipe and not yet out of it
    uint64_t nbytes # bytes the destination socket accepted
    bint eof        # the source has nothing more: EOF (splice returned 0), or it failed
    bint done       # EOF forwarded: pipe drained and destination shut down for writing
    bint at_mark    # the source stopped at its urgent mark (see forward_urgent)
    bint oob_have   # oob_byte was read from the source and still waits to be sent
    char oob_byte


cdef struct Pair  # forward declaration: Side points back to its Pair


cdef struct Side:
    Pair* pair
    int fd
    bint readable   # edge-triggered readiness, cleared on EAGAIN
    bint writable
    bint urgent     # EPOLLPRI seen: splice() may stop at an urgent mark
    bint rdhup      # EPOLLRDHUP or EPOLLHUP seen: the peer's FIN was reported
    int err         # the socket failed (errno): reset, timed out...; 0 while healthy


cdef struct Worker  # forward declaration


cdef struct Pair:
    Side side[2]    # side[0] is fd_a, side[1] is fd_b
    Dir dir[2]      # dir[0] moves a -> b, dir[1] moves b -> a
    int64_t ident
    int64_t last_ms # last time bytes moved (CLOCK_MONOTONIC_COARSE, ms)
    int reason      # END_LIVE while relaying, then a RelayEnd value
    bint in_ready
    bint registered # both fds are in the worker's epoll set
    bint flushing   # relaying is over; waiting for flush_side's peer to acknowledge, then reset
    int flush_side
    int flush_reason
    int flush_outq  # SIOCOUTQ at the last check (progress counts as activity)
    Pair* flush_prev
    Pair* flush_next
    Pair* lru_prev  # worker-local activity list (oldest first)
    Pair* lru_next
    Pair* ready_prev
    Pair* ready_next
    Pair* next      # inbox, ended and done lists (one at a time)
    Worker* worker
    # Bandwidth limits (issue 14 item 4): lim[d] are the buckets direction d draws from.
    Bucket* lim[2][MAX_LIMITS]
    int nlim[2]
    bint throttled  # on the worker's throttle list: out of tokens until wake_ms
    int64_t wake_ms
    Pair* thr_prev
    Pair* thr_next


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
    int ndead               # workers out of the rotation (atomic: s6_load/s6_add)
    int pipe_size
    size_t budget           # bytes per direction per turn before yielding to other pairs
    # Pipe accounting, shared by the workers (relaxed atomics: s6_*).
    int max_pipes           # pipes that may exist at once (descriptor budget); 0 = no cap
    int pipes               # pipes that exist (in use or pooled)
    long long pipe_budget   # bytes of pipe capacity allowed (user pipe quota); 0 = no cap
    long long pipe_bytes    # capacity of the pipes that exist
    long long pool_max      # bytes of idle pipes one worker may keep
    long long copied        # bytes relayed by copying, without a pipe
    long long pipe_errors   # pipe2() failures (EMFILE, ENFILE, ENOMEM)


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
    long long pool_bytes    # capacity of the pooled pipes
    int pipe_want           # F_SETPIPE_SZ request that last worked
    int64_t pipe_retry_ms   # when to ask for the full pipe_size again after a refusal
    unsigned char* scratch  # COPY_SIZE bytes for copying without a pipe (allocated on first use)
    int64_t now_ms
    Pair* flush_head        # pairs waiting for an acknowledgement before their reset
    Pair* thr_head          # pairs out of bandwidth tokens, each with its wake_ms
    int64_t flush_due_ms    # next SIOCOUTQ check of the flush list
    int64_t flush_every_ms  # interval of those checks (backs off while nothing moves)
    # Set once, when epoll_wait failed for good: the worker is out of the rotation.
    int dead                # atomic (s6_load/s6_add): read by add() without the lock
    int dead_errno          # written before dead, read after it (under the lock)
    # Bytes the destination sockets accepted, per direction (a -> b, b -> a), pairs live and
    # ended; written by this worker only (s6_bump64), read by `RelayEngine.relayed` (metrics).
    long long relayed[2]


# ---------------------------------------------------------------------------
# Small helpers (worker thread, no GIL)

cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    # The fine clock (vDSO, no syscall): refills of a few ms must not round to nothing.
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef void bucket_set(Bucket* b, double rate, double burst) noexcept nogil:
    """(Re)configure under b.lock: burst 0 means 1/20 s of the rate (at least 16 KiB, at most
    one second's worth), which keeps the first burst small next to a measured rate."""
    if burst <= 0:
        burst = rate / 20.0
        if burst < 16384.0:
            burst = 16384.0 if rate > 16384.0 else rate
    b.rate = rate
    b.burst = burst
    b.low = rate / LOW_SLICES
    if b.low < LOW_CHUNK:
        b.low = LOW_CHUNK
    if b.low > burst:
        b.low = burst
    if b.tokens > burst:
        b.tokens = burst


cdef inline void bucket_refill(Bucket* b, int64_t now) noexcept nogil:
    if now > b.last_ns:
        b.tokens += <double>(now - b.last_ns) * b.rate / 1e9
        if b.tokens > b.burst:
            b.tokens = b.burst
        b.last_ns = now


cdef void bucket_release(Bucket* b) noexcept nogil:
    if b != NULL and s6_add_fetch(&b.refs, -1) == 0:
        pthread_mutex_destroy(&b.lock)
        free(b)


cdef void pair_free(Pair* p) noexcept nogil:
    """Free an ended (or never started) pair and drop its bucket references."""
    cdef int d
    cdef int i
    for d in range(2):
        for i in range(p.nlim[d]):
            bucket_release(p.lim[d][i])
    free(p)


cdef void throttle_remove(Worker* w, Pair* p) noexcept nogil:
    if not p.throttled:
        return
    p.throttled = False
    if p.thr_prev != NULL:
        p.thr_prev.thr_next = p.thr_next
    else:
        w.thr_head = p.thr_next
    if p.thr_next != NULL:
        p.thr_next.thr_prev = p.thr_prev
    p.thr_prev = NULL
    p.thr_next = NULL


cdef void throttle_until(Worker* w, Pair* p, int64_t wake) noexcept nogil:
    """Park the pair until ``wake`` (ms): its readiness flags stay set, so the timer alone
    brings it back (edge-triggered epoll reports only new bytes meanwhile, and those stop
    once the kernel's receive window is full: no busy loop)."""
    if p.throttled:
        if wake < p.wake_ms:
            p.wake_ms = wake
        return
    p.throttled = True
    p.wake_ms = wake
    p.thr_prev = NULL
    p.thr_next = w.thr_head
    if w.thr_head != NULL:
        w.thr_head.thr_prev = p
    w.thr_head = p


cdef void wake_throttled(Worker* w) noexcept nogil:
    cdef Pair* p = w.thr_head
    cdef Pair* nxt
    while p != NULL:
        nxt = p.thr_next
        if p.wake_ms <= w.now_ms:
            throttle_remove(w, p)
            ready_push(w, p)
        p = nxt


cdef bint limit_allows(Worker* w, Pair* p, int d, size_t* limit) noexcept nogil:
    """Direction d has limits: may it read now, and how much (``limit``)? When a bucket is
    below its ``low`` mark the pair is parked until that bucket has refilled to it."""
    cdef int64_t now = monotonic_ns()
    cdef double avail = 1e18
    cdef double wait_ms = 0.0
    cdef double t
    cdef int i
    cdef Bucket* b
    for i in range(p.nlim[d]):
        b = p.lim[d][i]
        pthread_mutex_lock(&b.lock)
        bucket_refill(b, now)
        t = b.tokens
        if t < b.low:
            b.waits += 1
            if (b.low - t) * 1000.0 / b.rate > wait_ms:
                wait_ms = (b.low - t) * 1000.0 / b.rate
        pthread_mutex_unlock(&b.lock)
        if t < avail:
            avail = t
    if wait_ms > 0.0:
        throttle_until(w, p, w.now_ms + <int64_t>ceil(wait_ms))
        return False
    limit[0] = <size_t>avail
    return True


cdef void limit_charge(Pair* p, int d, ssize_t n) noexcept nogil:
    cdef int i
    cdef Bucket* b
    for i in range(p.nlim[d]):
        b = p.lim[d][i]
        pthread_mutex_lock(&b.lock)
        b.tokens -= <double>n
        pthread_mutex_unlock(&b.lock)


cdef int pipe_size_for(Worker* w, int have) noexcept nogil:
    """The capacity to ask for: the worker's request, halved while the engine's pipe
    budget has no room for it (``have``: what the pipe holds already). 0: not even the
    default size fits."""
    cdef Engine* e = w.engine
    cdef int size = w.pipe_want
    cdef long long room
    if e.pipe_budget <= 0:
        return size
    room = e.pipe_budget - s6_load64(&e.pipe_bytes) + have
    while size > MIN_PIPE_SIZE and size > room:
        size //= 2
    return size if size <= room else 0


cdef void pipe_grow(Worker* w, PipeBuf* pipe, int want) noexcept nogil:
    """Grow an empty pipe to ``want`` bytes, or as close as the kernel allows."""
    cdef int cap
    while want > pipe.cap:
        cap = fcntl(pipe.w, F_SETPIPE_SZ, want)
        if cap >= 0:
            s6_add64(&w.engine.pipe_bytes, cap - pipe.cap)
            pipe.cap = cap
            return
        # EPERM (pipe-max-size, or the user's quota, which other processes use too), or
        # ENOMEM: ask for half, and for the full size again after PIPE_RETRY_MS.
        w.pipe_retry_ms = w.now_ms + PIPE_RETRY_MS
        want //= 2
        if want < w.pipe_want:
            w.pipe_want = max(want, MIN_PIPE_SIZE)
        if want < MIN_PIPE_SIZE:
            return


cdef void pipe_close(Worker* w, PipeBuf* pipe) noexcept nogil:
    close(pipe.r)
    close(pipe.w)
    s6_add(&w.engine.pipes, -1)
    s6_add64(&w.engine.pipe_bytes, -pipe.cap)
    pipe.r = -1
    pipe.w = -1
    pipe.cap = 0


cdef int pipe_get(Worker* w, Dir* d) noexcept nogil:
    """Give direction d a pipe (from the pool or new). Returns 0, or -1 when there is none
    to be had (max_pipes reached, no budget left, or pipe2() failed): then copy."""
    cdef Engine* e = w.engine
    cdef int fds[2]
    cdef int cap
    cdef int want
    cdef int limit
    if d.pipe.r >= 0:
        return 0
    if w.pipe_want < e.pipe_size and w.now_ms >= w.pipe_retry_ms:
        w.pipe_want = e.pipe_size  # a refusal is not forever (issue 16 defect 4)
    if w.npool > 0:
        w.npool -= 1
        d.pipe = w.pool[w.npool]
        w.pool_bytes -= d.pipe.cap
        if d.pipe.cap < w.pipe_want:
            # A small pipe from a burst: grow it back when the budget has room again.
            want = pipe_size_for(w, d.pipe.cap)
            if want > d.pipe.cap:
                pipe_grow(w, &d.pipe, want)
        return 0
    limit = s6_load(&e.max_pipes)  # the asyncio thread may change it at any time
    if limit > 0 and s6_load(&e.pipes) >= limit:
        return -1
    want = pipe_size_for(w, 0)
    if want == 0:
        return -1
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        s6_add64(&e.pipe_errors, 1)
        return -1
    # What the kernel gave: 64 KiB, or 8 KiB when the user is over the soft pipe quota.
    cap = fcntl(fds[1], F_GETPIPE_SZ)
    if cap <= 0:
        cap = MIN_PIPE_SIZE
    d.pipe.r = fds[0]
    d.pipe.w = fds[1]
    d.pipe.cap = cap
    s6_add(&e.pipes, 1)
    s6_add64(&e.pipe_bytes, cap)
    if want > cap:
        pipe_grow(w, &d.pipe, want)
    return 0


cdef void pipe_put(Worker* w, Dir* d) noexcept nogil:
    """Take direction d's pipe back: to the pool when empty and the pool has room (POOL_MAX
    pipes, ``pool_max`` bytes), else close it (bytes still in it are lost)."""
    if d.pipe.r < 0:
        return
    if d.in_pipe == 0 and w.npool < POOL_MAX and w.pool_bytes + d.pipe.cap <= w.engine.pool_max:
        w.pool[w.npool] = d.pipe
        w.npool += 1
        w.pool_bytes += d.pipe.cap
        d.pipe.r = -1
        d.pipe.w = -1
        d.pipe.cap = 0
    else:
        pipe_close(w, &d.pipe)
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


cdef void flush_remove(Worker* w, Pair* p) noexcept nogil:
    if not p.flushing:
        return
    p.flushing = False
    if p.flush_prev != NULL:
        p.flush_prev.flush_next = p.flush_next
    else:
        w.flush_head = p.flush_next
    if p.flush_next != NULL:
        p.flush_next.flush_prev = p.flush_prev
    p.flush_prev = NULL
    p.flush_next = NULL


cdef void end_pair(Worker* w, Pair* p, int reason) noexcept nogil:
    """Finish a pair: unregister, close both sockets and its pipes, queue the report.

    Only END_EOF (EOF forwarded both ways, pipes empty) closes with FIN. Every other end
    is a cut, and both sockets are closed with SO_LINGER 0 so that each peer sees a reset:
    a FIN would make a cut-off transfer look complete to the receiver.
    """
    cdef int i
    if p.reason != END_LIVE:
        return
    p.reason = reason
    ready_remove(w, p)
    lru_remove(w, p)
    flush_remove(w, p)
    throttle_remove(w, p)
    for i in range(2):
        if p.registered:
            # Explicit removal: close() alone would keep the registration alive if
            # another process or descriptor still refers to the same socket, and a
            # later event would then carry a pointer to a freed Pair.
            epoll_ctl(w.epfd, EPOLL_CTL_DEL, p.side[i].fd, NULL)
        if reason != END_EOF:
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
# Failures: what a socket received before it failed is still delivered

cdef int finish_failed(Worker* w, Pair* p, int reason, int j) noexcept nogil:
    """The other socket failed, and everything it sent reached socket j: pass the failure on.

    Socket j is reset (end_pair) once its peer has acknowledged every byte queued on it
    (SIOCOUTQ 0): a reset sent earlier would discard the queue's tail, bytes the failed
    side's peer was told were delivered. Until then the pair sits on the worker's flush
    list, polled every FLUSH_POLL_MS or less often while nothing moves (bounded by the
    idle timeout). Returns -1: the pair relays no more.
    """
    cdef int queued = 0
    if (
        p.side[j].err == 0
        and ioctl(p.side[j].fd, SIOCOUTQ, &queued) == 0
        and queued > 0
    ):
        ready_remove(w, p)
        p.flushing = True
        p.flush_side = j
        p.flush_reason = reason
        p.flush_outq = queued
        p.flush_prev = NULL
        p.flush_next = w.flush_head
        if w.flush_head != NULL:
            w.flush_head.flush_prev = p
        w.flush_head = p
        w.flush_every_ms = FLUSH_POLL_MS
        w.flush_due_ms = w.now_ms + FLUSH_POLL_MS
        return -1
    end_pair(w, p, reason)
    return -1


cdef void poll_flushing(Worker* w) noexcept nogil:
    """End the flushing pairs whose surviving socket has no unacknowledged byte left."""
    cdef Pair* p = w.flush_head
    cdef Pair* nxt
    cdef int queued
    cdef bint moved = False
    while p != NULL:
        nxt = p.flush_next
        queued = 0
        if ioctl(p.side[p.flush_side].fd, SIOCOUTQ, &queued) < 0 or queued <= 0:
            end_pair(w, p, p.flush_reason)
            moved = True
        elif queued < p.flush_outq:
            # The peer is reading: that is activity, so the idle timeout starts over.
            p.flush_outq = queued
            touch(w, p)
            moved = True
        p = nxt
    # A peer that stopped reading costs fewer and fewer checks.
    if moved:
        w.flush_every_ms = FLUSH_POLL_MS
    elif w.flush_every_ms < FLUSH_POLL_MAX_MS:
        w.flush_every_ms *= 2
    w.flush_due_ms = w.now_ms + w.flush_every_ms


cdef void mark_failed(Worker* w, Pair* p, int i, int err) noexcept nogil:
    """Record that socket i failed; bytes still bound for it can never be delivered."""
    if p.side[i].err == 0:
        p.side[i].err = err if err != 0 else EIO
    # Direction 1 - i writes to socket i: drop its pipe (pipe_put closes a non-empty one).
    pipe_put(w, &p.dir[1 - i])


cdef int fail_side(Worker* w, Pair* p, int i, int err) noexcept nogil:
    """Socket i failed (EPOLLERR, or a splice() into it failed).

    Its receive queue may still hold bytes it got before the reset: they go on to the
    other socket first (the direction from i keeps pumping until splice() finds the
    queue empty), then the failure is passed on (finish_failed). Returns -1 when the pair
    stopped relaying, 1 when it must be pumped again.
    """
    mark_failed(w, p, i, err)
    if p.side[1 - i].err != 0:
        # Both sockets failed: nothing can be delivered any more.
        end_pair(w, p, error_reason(p.side[i].err))
        return -1
    if p.dir[i].done:
        # Its EOF was forwarded before the failure: nothing of it is left to deliver.
        return finish_failed(w, p, error_reason(p.side[i].err), 1 - i)
    # Read on: a reset socket answers with its queued bytes first, then 0 or the error.
    p.side[i].readable = True
    ready_push(w, p)
    return 1


# ---------------------------------------------------------------------------
# Urgent data (MSG_OOB)

cdef int forward_urgent(Worker* w, Pair* p, int d) noexcept nogil:
    """Direction d's source stopped at its urgent mark and every byte before the mark
    reached the destination (the pipe is empty): forward the urgent byte, step over it.

    splice(2) never reads across an urgent mark (tcp_read_sock stops there: EAGAIN, or 0
    once a FIN is queued), so without this the direction would stall, or end early.
    The urgent byte goes out as urgent, with send(MSG_OOB), right after the bytes that
    preceded it: the receiver sees what direct TCP would show it (SIGURG, SIOCATMARK,
    recv(MSG_OOB), or the byte in-band if it set SO_OOBINLINE). A plain recv() then
    steps over the mark (SO_OOBINLINE is off on our sockets, so the kernel skips the
    urgent byte) and returns the in-band bytes after it, which go into the empty pipe
    ahead of anything spliced later.

    Returns 1 when the mark was passed (or the destination failed: dst.err is set), 0
    when blocked on the destination (EPOLLOUT resumes), -1 when the pair stopped relaying.
    """
    cdef Dir* dr = &p.dir[d]
    cdef Side* src = &p.side[d]
    cdef Side* dst = &p.side[1 - d]
    cdef char buf[URGENT_STEP]
    cdef ssize_t n
    cdef ssize_t m
    if not dr.oob_have:
        # Fails (EINVAL) when there is no urgent byte to read: a newer urgent pointer
        # replaced it, and the kernel already dropped it from the stream. Nothing to send.
        if recv(src.fd, &dr.oob_byte, 1, MSG_OOB) == 1:
            dr.oob_have = True
            if sockatmark(src.fd) != 1:
                # A newer urgent pointer arrived between the mark check and this read
                # (the kernel then drops the old urgent byte): the byte read belongs to
                # the new mark, further on. Keep it for that mark and relay up to it.
                dr.at_mark = False
                return 1
    if dr.oob_have:
        if not dst.writable:
            return 0
        while True:
            n = send(dst.fd, &dr.oob_byte, 1, MSG_OOB | MSG_NOSIGNAL)
            if n == 1:
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                dst.writable = False
                return 0
            # The destination failed: this direction is dead (the caller sees dst.err).
            return fail_side(w, p, 1 - d, errno)
        dr.oob_have = False
        dr.nbytes += 1
        s6_bump64(&w.relayed[d], 1)
    if pipe_get(w, dr) < 0:
        # No pipe to be had (descriptors, pipe budget): step over the mark by copying.
        return urgent_step_without_pipe(w, p, d)
    dr.at_mark = False
    n = recv(src.fd, buf, URGENT_STEP, 0)
    if n > 0:
        # The pipe is empty and holds at least a page: a write of at most one page
        # (PIPE_BUF) into it is whole.
        m = write(dr.pipe.w, buf, <size_t>n)
        if m != n:
            end_pair(w, p, END_ERROR)
            return -1
        dr.in_pipe = <size_t>n
    elif n == 0:
        dr.eof = True
    elif errno == EAGAIN:
        # The mark is passed (the kernel stepped over the urgent byte); the socket is empty.
        src.readable = False
    elif errno != EINTR:
        mark_failed(w, p, d, errno)
        dr.eof = True
    return 1


# ---------------------------------------------------------------------------
# Without a pipe: copying through the worker's buffer (see Strategy)

cdef bint get_scratch(Worker* w) noexcept nogil:
    if w.scratch == NULL:
        w.scratch = <unsigned char*>malloc(COPY_SIZE)
    return w.scratch != NULL


cdef void consume(Worker* w, int fd, ssize_t count) noexcept nogil:
    """Read and drop ``count`` bytes that a peek showed queued (a read at an urgent mark
    steps over the urgent byte, as the peek did). Only a reset can cut it short; the
    next step reports that."""
    cdef ssize_t n
    while count > 0:
        n = recv(fd, w.scratch, <size_t>count, MSG_DONTWAIT)
        if n < 0 and errno == EINTR:
            continue
        if n <= 0:
            return
        count -= n


cdef int copy_step(Worker* w, Pair* p, int d, size_t* moved, size_t most) noexcept nogil:
    """Move up to ``most`` (at most COPY_SIZE) bytes of direction d without a pipe: peek, send, then consume
    exactly what the destination accepted (the rest stays queued in the source socket).
    Returns a COPY_* outcome; ``moved`` gets the bytes moved."""
    cdef Dir* dr = &p.dir[d]
    cdef Side* src = &p.side[d]
    cdef Side* dst = &p.side[1 - d]
    cdef ssize_t n
    cdef ssize_t sent
    moved[0] = 0
    if not dst.writable:
        return COPY_BLOCKED
    if not get_scratch(w):
        end_pair(w, p, END_ERROR)
        return COPY_STOPPED
    while True:
        n = recv(src.fd, w.scratch, most if most < COPY_SIZE else COPY_SIZE, MSG_PEEK | MSG_DONTWAIT)
        if n >= 0 or errno != EINTR:
            break
    # A peek at an urgent mark skips the urgent byte: at the mark, send nothing yet and let
    # forward_urgent() forward it (race-free: peeked bytes before a mark leave us off it).
    if n >= 0 or errno == EAGAIN:
        if sockatmark(src.fd) == 1:
            dr.at_mark = True
            return COPY_CHANGED
    if n == 0:
        dr.eof = True
        return COPY_CHANGED
    if n < 0:
        if errno == EAGAIN:
            src.urgent = False
            src.readable = False
            if src.err != 0:
                # Failed, yet not closed, and drained: pass the failure on.
                dr.eof = True
                return COPY_CHANGED
            return COPY_BLOCKED
        # The source failed with its receive queue empty: pass it on (step 2).
        mark_failed(w, p, d, errno)
        dr.eof = True
        return COPY_CHANGED
    while True:
        sent = send(dst.fd, w.scratch, <size_t>n, MSG_DONTWAIT | MSG_NOSIGNAL)
        if sent >= 0 or errno != EINTR:
            break
    if sent < 0:
        if errno == EAGAIN:
            dst.writable = False
            return COPY_BLOCKED
        # The destination failed: what it sent us still goes the other way.
        return COPY_STOPPED if fail_side(w, p, 1 - d, errno) < 0 else COPY_AGAIN
    consume(w, src.fd, sent)
    dr.nbytes += <uint64_t>sent
    s6_bump64(&w.relayed[d], sent)
    s6_add64(&w.engine.copied, sent)
    moved[0] = <size_t>sent
    return COPY_MOVED


cdef int urgent_step_without_pipe(Worker* w, Pair* p, int d) noexcept nogil:
    """forward_urgent() without a pipe, once the urgent byte went out: step over the mark.

    A peek at the mark skips the urgent byte and shows the in-band bytes after it; what
    the destination accepts of them is then consumed (that read steps over the urgent
    byte too). With nothing after the mark yet the direction waits at the mark (the next
    byte's EPOLLIN brings it back), so no byte is ever consumed that was not delivered.
    Returns forward_urgent()'s values: 1 passed, 0 blocked, -1 stopped relaying.
    """
    cdef Dir* dr = &p.dir[d]
    cdef Side* src = &p.side[d]
    cdef Side* dst = &p.side[1 - d]
    cdef ssize_t n
    cdef ssize_t sent
    if not dst.writable:
        return 0
    if not get_scratch(w):
        end_pair(w, p, END_ERROR)
        return -1
    while True:
        n = recv(src.fd, w.scratch, COPY_SIZE, MSG_PEEK | MSG_DONTWAIT)
        if n >= 0 or errno != EINTR:
            break
    if n == 0:
        # A FIN right after the urgent byte: this read steps over it and meets the EOF.
        recv(src.fd, w.scratch, 1, MSG_DONTWAIT)
        dr.at_mark = False
        dr.eof = True
        return 1
    if n < 0:
        if errno == EAGAIN:
            src.readable = False
            return 0
        mark_failed(w, p, d, errno)
        dr.at_mark = False
        dr.eof = True
        return 1
    while True:
        sent = send(dst.fd, w.scratch, <size_t>n, MSG_DONTWAIT | MSG_NOSIGNAL)
        if sent >= 0 or errno != EINTR:
            break
    if sent < 0:
        if errno == EAGAIN:
            dst.writable = False
            return 0
        return fail_side(w, p, 1 - d, errno)
    consume(w, src.fd, sent)
    dr.nbytes += <uint64_t>sent
    s6_bump64(&w.relayed[d], sent)
    s6_add64(&w.engine.copied, sent)
    dr.at_mark = False
    return 1


# ---------------------------------------------------------------------------
# The pump: one direction of one pair

cdef int pump(Worker* w, Pair* p, int d) noexcept nogil:
    """Move bytes of direction d until blocked or out of budget.

    Returns 0 when nothing more can move until the next event, 1 when the budget
    ran out with work left (or a failure needs another turn), -1 when the pair stopped
    relaying (ended, or waiting on the flush list to pass a failure on).
    """
    cdef Dir* dr = &p.dir[d]
    cdef Side* src = &p.side[d]
    cdef Side* dst = &p.side[1 - d]
    cdef Dir* other = &p.dir[1 - d]
    cdef size_t moved = 0
    cdef bint active = False
    cdef ssize_t n
    cdef int r
    cdef size_t copied
    cdef bint progressed
    cdef size_t limit = <size_t>-1
    cdef size_t room
    if dr.done or dst.err != 0:
        # Finished, or dead: its destination failed and mark_failed() dropped its pipe.
        return 0
    while True:
        progressed = False
        # 1. Pipe -> destination socket.
        if dr.in_pipe > 0 and dst.writable:
            n = splice(dr.pipe.r, NULL, dst.fd, NULL, dr.in_pipe, SPLICE_FLAGS)
            if n > 0:
                dr.in_pipe -= <size_t>n
                dr.nbytes += <uint64_t>n
                s6_bump64(&w.relayed[d], n)
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
                    # The destination failed: what it sent us still goes the other way.
                    if active:
                        touch(w, p)
                    return fail_side(w, p, 1 - d, errno)
        # 2. Pipe empty: step over an urgent mark, or return the pipe to the pool and
        #    forward a pending EOF.
        if dr.in_pipe == 0:
            if dr.at_mark:
                r = forward_urgent(w, p, d)
                if r < 0:
                    return -1
                if r == 0:
                    if active:
                        touch(w, p)
                    return 0
                active = True
                if dst.err != 0:
                    return 1  # the destination failed meanwhile; the other way drains
                continue
            pipe_put(w, dr)
            if dr.eof:
                if active:
                    touch(w, p)
                if src.err != 0:
                    # The source failed after sending these bytes, and every one of them
                    # reached the destination: now pass the failure on (a reset).
                    return finish_failed(w, p, error_reason(src.err), 1 - d)
                # Half-close: the source is done and everything reached the destination.
                # shutdown() can fail with ENOTCONN if the destination was reset meanwhile;
                # the other direction reports that reset, so the error is ignored here.
                shutdown(dst.fd, SHUT_WR)
                dr.done = True
                if other.done:
                    end_pair(w, p, END_EOF)
                    return -1
                return 0
        # 3. Source socket -> pipe, while the pipe has room.
        if (
            not dr.eof
            and not dr.at_mark
            and src.readable
            and (dr.pipe.r < 0 or dr.in_pipe < <size_t>dr.pipe.cap)
            # Bandwidth limits: one int test for an unlimited direction; a limited one reads
            # at most its tokens, or is parked until they refill (limit_allows).
            and (p.nlim[d] == 0 or limit_allows(w, p, d, &limit))
        ):
            if pipe_get(w, dr) < 0:
                # No pipe to be had: copy through user space rather than cut (see Strategy).
                r = copy_step(w, p, d, &copied, limit)
                if r == COPY_STOPPED:
                    return -1
                if r == COPY_BLOCKED or r == COPY_AGAIN:
                    if active:
                        touch(w, p)
                    return 0 if r == COPY_BLOCKED else 1
                if r == COPY_MOVED:
                    if p.nlim[d] != 0:
                        limit_charge(p, d, <ssize_t>copied)
                    moved += copied
                    active = True
                    if moved >= w.engine.budget:
                        touch(w, p)
                        return 1
                continue
            room = <size_t>dr.pipe.cap - dr.in_pipe
            n = splice(src.fd, NULL, dr.pipe.w, NULL, room if room < limit else limit, SPLICE_FLAGS)
            if n > 0:
                if p.nlim[d] != 0:
                    limit_charge(p, d, n)
                dr.in_pipe += <size_t>n
                active = True
                progressed = True
            elif n == 0:
                # EOF, unless splice() stopped at an urgent mark with a FIN queued behind
                # it. The urgent byte and the FIN can land while we pump, before their
                # event, so sockatmark() is asked unless the FIN's event came first: the
                # urgent byte precedes the FIN in the stream, so the event that reported
                # RDHUP also reported EPOLLPRI (tcp_poll computes both at once) had urgent
                # data been pending. The common EOF (event first) costs no syscall.
                if (src.urgent or not src.rdhup) and sockatmark(src.fd) == 1:
                    dr.at_mark = True
                else:
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
                    if src.urgent and sockatmark(src.fd) == 1:
                        # Not empty: stopped at the urgent mark (step 2 forwards it).
                        dr.at_mark = True
                        progressed = True
                    else:
                        # Nothing before a mark either: a later urgent byte brings a
                        # new EPOLLPRI edge.
                        src.urgent = False
                        src.readable = False
                        pipe_put(w, dr)
                        if src.err != 0:
                            # Failed, yet not closed, and drained: pass the failure on.
                            dr.eof = True
                            progressed = True
            else:
                # The source failed. splice() reports an error only once the receive
                # queue is empty: every byte it received is in the pipe now. Deliver
                # them, then pass the failure on (step 2); nothing more can reach it.
                mark_failed(w, p, d, errno)
                dr.eof = True
                progressed = True
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
        ev.events = EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLRDHUP | EPOLLET
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
    # The list is ordered by last activity: stop at the first pair still fresh. A pair
    # waiting to pass a failure on (flushing) ends with that failure, not IDLE.
    while w.lru_head != NULL and w.lru_head.last_ms + idle_ms <= w.now_ms:
        end_pair(w, w.lru_head, w.lru_head.flush_reason if w.lru_head.flushing else END_IDLE)


cdef int wait_timeout(Worker* w) noexcept nogil:
    cdef int64_t left = 0
    cdef bint have = False
    cdef int64_t now
    cdef Pair* p
    if w.ready_head != NULL:
        return 0
    if w.flush_head == NULL and w.thr_head == NULL and (w.engine.idle_ms <= 0 or w.lru_head == NULL):
        return -1
    now = monotonic_ms()
    if w.engine.idle_ms > 0 and w.lru_head != NULL:
        left = w.lru_head.last_ms + w.engine.idle_ms - now
        have = True
    if w.flush_head != NULL and (not have or w.flush_due_ms - now < left):
        left = w.flush_due_ms - now
        have = True
    # Throttled pairs: the earliest refill (the list holds only pairs out of tokens).
    p = w.thr_head
    while p != NULL:
        if not have or p.wake_ms - now < left:
            left = p.wake_ms - now
            have = True
        p = p.thr_next
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
            w.dead_errno = errno
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
            if p.flushing:
                # Relaying is over; poll_flushing() watches the survivor's send queue. An
                # error there (it was reset too) leaves nothing to wait for.
                if events[i].events & EPOLLERR and side == &p.side[p.flush_side]:
                    end_pair(w, p, p.flush_reason)
                continue
            if events[i].events & EPOLLERR:
                err = 0
                errlen = sizeof(err)
                getsockopt(side.fd, SOL_SOCKET, SO_ERROR, &err, &errlen)
                # Not the end yet: bytes the socket received before its reset are still
                # in its receive queue, and go to the other side first (fail_side).
                if err != 0 and fail_side(w, p, 0 if side == &p.side[0] else 1, err) < 0:
                    continue
            if events[i].events & EPOLLPRI:
                # Urgent data: splice() will stop at its mark (forward_urgent).
                side.urgent = True
            if events[i].events & (EPOLLRDHUP | EPOLLHUP):
                side.rdhup = True
            if events[i].events & (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
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
        if w.flush_head != NULL and w.now_ms >= w.flush_due_ms:
            poll_flushing(w)
        if w.thr_head != NULL:
            # Refilled buckets: those pairs run next turn (wait_timeout returns 0 for them).
            wake_throttled(w)
        expire_idle(w)
        flush_ended(w)
    # Stop (or a broken epoll set): refuse new pairs from now on (add() checks the flag
    # under the lock), adopt what is still in the inbox, end everything.
    pthread_mutex_lock(&w.lock)
    w.stop = True
    if not stop:
        # epoll_wait failed for good: out of the rotation. add() skips a dead worker from
        # now on; the engine's donefd wakes the asyncio side, which logs it
        # (RelayEngine.dead_workers) and keeps serving on the other workers.
        s6_add(&w.dead, 1)
        s6_add(&w.engine.ndead, 1)
    pthread_mutex_unlock(&w.lock)
    take_control(w)
    while w.lru_head != NULL:
        end_pair(w, w.lru_head, END_SHUTDOWN if stop else END_ERROR)
    flush_ended(w)
    if not stop:
        wake_fd(w.engine.donefd)
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
            pipe_close(w, &w.pool[j])
        w.npool = 0
        w.pool_bytes = 0
        free(w.scratch)
        w.scratch = NULL
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
        rc = open_worker_loop(&w.epfd, &w.wakefd)
        if rc != 0:
            return rc
    rc = 0
    for i in range(nworkers):
        w = &e.workers[i]
        # worker_main gets its Worker* through the void* argument.
        rc = start_worker_thread(&w.thread, worker_main, <void*>w)
        if rc != 0:
            break
        w.started = True
    return rc


cdef void free_done(Engine* e) noexcept nogil:
    cdef Pair* p = e.done_head
    cdef Pair* nxt
    while p != NULL:
        nxt = p.next
        pair_free(p)
        p = nxt
    e.done_head = NULL
    e.done_tail = NULL


_END_MEMBERS = tuple(sorted(RelayEnd, key=int))


cdef class TokenBucket:
    """A bandwidth limit in bytes per second, shared by every relay handed it (issue 14
    item 4): the C workers draw from it before each splice, without the GIL, and the
    asyncio path calls `take`. ``burst`` (bytes) is the most it holds; 0 picks 1/20 s of
    the rate (16 KiB at least, one second's worth at most). It starts full.

    `configure` changes rate and burst in place: relays already holding the bucket follow.
    """

    cdef Bucket* _b

    def __cinit__(self, double rate, double burst=0.0) -> None:
        self._b = NULL
        if not (rate > 0.0 and rate < 1e15):
            raise ValueError(f"rate must be above 0 and below 1e15 bytes/s, got {rate}")
        if not (burst >= 0.0 and burst < 1e15):
            raise ValueError(f"burst must be at least 0 and below 1e15 bytes, got {burst}")
        self._b = <Bucket*>calloc(1, sizeof(Bucket))
        if self._b == NULL:
            raise MemoryError()
        pthread_mutex_init(&self._b.lock, NULL)
        self._b.refs = 1
        bucket_set(self._b, rate, burst)
        self._b.tokens = self._b.burst
        self._b.last_ns = monotonic_ns()

    def __dealloc__(self) -> None:
        # Pairs still relaying keep the struct alive (refs); the last one frees it.
        bucket_release(self._b)
        self._b = NULL

    def configure(self, double rate, double burst=0.0) -> None:
        """New rate and burst, for every relay drawing from this bucket from now on."""
        if not (rate > 0.0 and rate < 1e15):
            raise ValueError(f"rate must be above 0 and below 1e15 bytes/s, got {rate}")
        if not (burst >= 0.0 and burst < 1e15):
            raise ValueError(f"burst must be at least 0 and below 1e15 bytes, got {burst}")
        pthread_mutex_lock(&self._b.lock)
        bucket_refill(self._b, monotonic_ns())
        bucket_set(self._b, rate, burst)
        pthread_mutex_unlock(&self._b.lock)

    def take(self, long long n) -> float:
        """Spend ``n`` bytes now (the asyncio path, after reading them); the seconds to wait
        before reading more (0.0 while the bucket is not in debt)."""
        cdef double debt
        pthread_mutex_lock(&self._b.lock)
        bucket_refill(self._b, monotonic_ns())
        self._b.tokens -= <double>n
        debt = -self._b.tokens
        if debt > 0.0:
            self._b.waits += 1
        pthread_mutex_unlock(&self._b.lock)
        return debt / self._b.rate if debt > 0.0 else 0.0

    @property
    def rate(self) -> float:
        return self._b.rate

    @property
    def burst(self) -> float:
        return self._b.burst

    @property
    def waits(self) -> int:
        """Times a relay had to wait for this bucket's tokens since it was made."""
        cdef uint64_t n
        pthread_mutex_lock(&self._b.lock)
        n = self._b.waits
        pthread_mutex_unlock(&self._b.lock)
        return n

    @property
    def tokens(self) -> float:
        """Tokens now (bytes; below 0 while in debt)."""
        cdef double t
        pthread_mutex_lock(&self._b.lock)
        bucket_refill(self._b, monotonic_ns())
        t = self._b.tokens
        pthread_mutex_unlock(&self._b.lock)
        return t


cdef class RelayEngine:
    """A pool of C worker threads relaying pairs of connected stream sockets with splice(2).

    Args:
        workers: worker threads; 0 means one per CPU this process may run on.
        idle_timeout: seconds without a byte moving in either direction after which a
            pair ends with ``RelayEnd.IDLE_TIMEOUT``; 0 disables it.
        pipe_size: requested capacity of each relay pipe (F_SETPIPE_SZ); the kernel's
            limits and ``pipe_budget`` may make it smaller.
        max_pipes: pipes that may exist at once (each is two descriptors); 0 = no cap.
            Past it a relay copies through user space instead (see Strategy).
        pipe_budget: bytes of pipe capacity the engine may hold, in use or pooled (the
            user's pipe quota, `socks6fast.dataplane.resources.pipe_quota`); 0 = no cap.

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

    def __init__(
        self,
        int workers=0,
        double idle_timeout=0.0,
        int pipe_size=1 << 20,
        int max_pipes=0,
        long long pipe_budget=0,
    ) -> None:
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
        if max_pipes < 0:
            raise ValueError(f"max_pipes must be >= 0, got {max_pipes}")
        if pipe_budget < 0:
            raise ValueError(f"pipe_budget must be >= 0, got {pipe_budget}")
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
        self._eng.max_pipes = max_pipes
        self._eng.pipe_budget = pipe_budget
        # Idle pipes: at most a quarter of the budget in all the pools together (every pipe
        # in a pool counts against the user's quota as much as one in use).
        self._eng.pool_max = (1 << 62) if pipe_budget == 0 else pipe_budget // (4 * nworkers)
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
        """Number of worker threads (0 once closed), dead ones included."""
        return 0 if self._closed else self._eng.nworkers

    @property
    def max_pipes(self) -> int:
        """Pipes that may exist at once (0: no cap); past it relays copy without a pipe."""
        return 0 if self._eng == NULL else s6_load(&self._eng.max_pipes)

    @max_pipes.setter
    def max_pipes(self, int value) -> None:
        if value < 0:
            raise ValueError(f"max_pipes must be >= 0, got {value}")
        if self._eng != NULL:
            s6_store(&self._eng.max_pipes, value)

    @property
    def pipe_budget(self) -> int:
        """Bytes of pipe capacity the engine may hold (0: no cap)."""
        return 0 if self._eng == NULL else self._eng.pipe_budget

    @property
    def pipes(self) -> int:
        """Pipes that exist now, in use or pooled."""
        return 0 if self._eng == NULL else s6_load(&self._eng.pipes)

    @property
    def pipe_bytes(self) -> int:
        """Total capacity of those pipes, in bytes."""
        return 0 if self._eng == NULL else s6_load64(&self._eng.pipe_bytes)

    @property
    def copied(self) -> int:
        """Bytes relayed by copying through user space because no pipe was to be had."""
        return 0 if self._eng == NULL else s6_load64(&self._eng.copied)

    @property
    def relayed(self) -> tuple[int, int]:
        """Bytes relayed since the engine started, ``(a -> b, b -> a)``: what the destination
        sockets accepted, for live and ended pairs alike (each worker's own counters, summed
        here; issue 14 metrics). (0, 0) once closed."""
        cdef long long a_to_b = 0
        cdef long long b_to_a = 0
        cdef int i
        if self._eng == NULL or self._closed:
            return (0, 0)
        for i in range(self._eng.nworkers):
            a_to_b += s6_load64(&self._eng.workers[i].relayed[0])
            b_to_a += s6_load64(&self._eng.workers[i].relayed[1])
        return (a_to_b, b_to_a)

    @property
    def pipe_errors(self) -> int:
        """pipe2() failures (EMFILE, ENFILE, ENOMEM) since the engine started."""
        return 0 if self._eng == NULL else s6_load64(&self._eng.pipe_errors)

    @property
    def live_workers(self) -> int:
        """Worker threads still taking pairs: :attr:`workers` minus the dead ones."""
        if self._closed:
            return 0
        return self._eng.nworkers - s6_load(&self._eng.ndead)

    @property
    def dead_count(self) -> int:
        """Workers taken out of the rotation because epoll_wait failed (one atomic read)."""
        return 0 if self._eng == NULL else s6_load(&self._eng.ndead)

    def dead_workers(self) -> list:
        """The workers whose epoll_wait failed for good, as ``(index, errno)`` pairs.

        Such a worker ended its pairs (``RelayEnd.ERROR``) and takes no new ones; the
        others keep relaying. The engine's eventfd is written when a worker dies, so a
        caller watching :meth:`fileno` learns of it promptly.
        """
        cdef list out = []
        cdef int i
        cdef int err
        cdef bint dead
        cdef Worker* w
        if self._closed:
            return out
        for i in range(self._eng.nworkers):
            w = &self._eng.workers[i]
            pthread_mutex_lock(&w.lock)
            dead = s6_load(&w.dead) != 0
            err = w.dead_errno
            pthread_mutex_unlock(&w.lock)
            if dead:
                out.append((i, err))
        return out

    def _break_worker_epoll(self, int index) -> None:
        """Test hook: make worker ``index``'s epoll_wait fail for good, as it would if its
        epoll descriptor were closed or clobbered by a bug elsewhere in the process.

        The epoll fd number is atomically pointed at a fresh eventfd (dup3), which is no
        epoll set: the worker's next epoll_wait fails with EINVAL. It is woken first (its
        wake eventfd is still registered in the old set, alive until that wait returns).
        Only tests call this; the engine never does.
        """
        cdef Worker* w
        cdef int fd
        if self._closed:
            raise ValueError("RelayEngine is closed")
        if not 0 <= index < self._eng.nworkers:
            raise ValueError(f"no worker {index}")
        w = &self._eng.workers[index]
        fd = eventfd(0, EFD_CLOEXEC)
        if fd < 0:
            raise OSError(errno, os.strerror(errno))
        if dup3(fd, w.epfd, O_CLOEXEC) < 0:
            close(fd)
            raise OSError(errno, os.strerror(errno))
        close(fd)
        wake_fd(w.wakefd)

    def add(self, int fd_a, int fd_b, ident, tuple up=(), tuple down=()) -> None:
        """Relay between two connected stream sockets until both directions end.

        Both fds are switched to non-blocking mode and owned by the engine from a
        successful return on: it closes them when the pair ends. The pair is reported
        by :meth:`drain` as ``(ident, bytes a->b, bytes b->a, RelayEnd)``.

        Args:
            fd_a: one socket (the server puts the client leg here).
            fd_b: the other socket (the remote leg).
            ident: caller's key for this pair, unique among pairs not yet drained,
                in the signed 64-bit range.
            up: `TokenBucket` limits (at most two) on a -> b: the worker reads at most
                their tokens before each splice and parks the direction while they refill.
            down: likewise on b -> a. Empty (the default): unlimited, no bucket touched.

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
        cdef Bucket* b
        cdef int fds[2]
        if self._closed:
            raise ValueError("RelayEngine is closed")
        if fd_a < 0 or fd_b < 0 or fd_a == fd_b:
            raise ValueError(f"need two distinct open fds, got {fd_a} and {fd_b}")
        if ident in self._routes:
            raise ValueError(f"ident {ident} is already relayed")
        if len(up) > MAX_LIMITS or len(down) > MAX_LIMITS:
            raise ValueError(f"at most {MAX_LIMITS} limits per direction")
        for bucket in up + down:
            if not isinstance(bucket, TokenBucket):
                raise TypeError(f"limits must be TokenBucket objects, got {type(bucket).__name__}")
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
        for i, limits in enumerate((up, down)):
            for bucket in limits:
                b = (<TokenBucket>bucket)._b
                s6_add(&b.refs, 1)  # released by pair_free()
                p.lim[i][p.nlim[i]] = b
                p.nlim[i] += 1
        for i in range(2):
            p.side[i].pair = p
            p.side[i].fd = fds[i]
            p.side[i].readable = True
            p.side[i].writable = True
            p.dir[i].pipe.r = -1
            p.dir[i].pipe.w = -1
        # Count the pair before the worker can see (and possibly finish) it.
        pthread_mutex_lock(&e.lock)
        e.active += 1
        pthread_mutex_unlock(&e.lock)
        while True:
            # Least-loaded live worker; the scan starts at a rotating index so ties
            # spread out. A dead worker (epoll_wait failed) is out of the rotation.
            best = -1
            load = 0
            for i in range(e.nworkers):
                idx = (e.rr + i) % e.nworkers
                if s6_load(&e.workers[idx].dead):
                    continue
                if best < 0 or s6_load(&e.workers[idx].load) < load:
                    best = idx
                    load = s6_load(&e.workers[idx].load)
            e.rr = (e.rr + 1) % e.nworkers
            if best < 0:
                pthread_mutex_lock(&e.lock)
                e.active -= 1
                pthread_mutex_unlock(&e.lock)
                pair_free(p)
                raise OSError(EIO, "no relay worker left: every worker's epoll_wait failed")
            w = &e.workers[best]
            p.worker = w
            s6_add(&w.load, 1)
            # The worker holds this lock only to swap lists, so taking it with the GIL
            # held cannot deadlock (workers never take the GIL).
            pthread_mutex_lock(&w.lock)
            if not w.stop:
                break
            # Died after the scan (dead is set under this lock): pick another one.
            pthread_mutex_unlock(&w.lock)
            s6_add(&w.load, -1)
            if not s6_load(&w.dead):
                # Stopping (close() runs in another thread): no worker will take it.
                pthread_mutex_lock(&e.lock)
                e.active -= 1
                pthread_mutex_unlock(&e.lock)
                pair_free(p)
                raise ValueError("RelayEngine is closed")
        p.next = w.inbox
        w.inbox = p
        pthread_mutex_unlock(&w.lock)
        wake_fd(w.wakefd)
        self._routes[ident] = best

    def cancel(self, ident) -> None:
        """End one pair now, with reason ``RelayEnd.SHUTDOWN``; both sockets are reset.

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
        if s6_load(&w.dead):
            return  # a dead worker ended its pairs already; drain() reports them
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
                pair_free(head)
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
