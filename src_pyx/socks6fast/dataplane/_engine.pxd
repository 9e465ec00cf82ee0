# cython: language_level=3
# What the two native engines share: the splice relay (_relay_c) and the UDP engine
# (_udp_c) each run C worker threads with their own epoll set and a wake eventfd, and
# report to the asyncio loop through another eventfd. Inline functions only (no module
# of its own): each engine compiles its copy, so nothing changes on its hot path.

from libc.errno cimport errno
from libc.stdint cimport int64_t, uint64_t

from socks6fast.includes.linux cimport (
    CLOCK_MONOTONIC_COARSE,
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    EPOLL_CLOEXEC,
    EPOLL_CTL_ADD,
    EPOLLIN,
    SIG_SETMASK,
    clock_gettime,
    epoll_create1,
    epoll_ctl,
    epoll_event,
    eventfd,
    pthread_create,
    pthread_sigmask,
    pthread_t,
    read,
    sigfillset,
    sigset_t,
    timespec,
    write,
)


cdef inline int64_t monotonic_ms() noexcept nogil:
    cdef timespec ts
    # CLOCK_MONOTONIC_COARSE is a vDSO read (no syscall); its few-ms granularity is
    # plenty for idle and first-datagram timeouts.
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


cdef inline int open_worker_loop(int* epfd, int* wakefd) noexcept nogil:
    """A worker's epoll set and wake eventfd, registered level-triggered with data.ptr
    NULL (which marks the wake fd among the engine's pointers). 0 or an errno value; an
    fd already opened is left in place for the engine's release to close."""
    cdef epoll_event ev
    epfd[0] = epoll_create1(EPOLL_CLOEXEC)
    if epfd[0] < 0:
        return errno
    wakefd[0] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if wakefd[0] < 0:
        return errno
    ev.events = EPOLLIN
    ev.data.ptr = NULL
    if epoll_ctl(epfd[0], EPOLL_CTL_ADD, wakefd[0], &ev) < 0:
        return errno
    return 0


cdef inline int start_worker_thread(pthread_t* thread, void* (*start)(void*) noexcept nogil,
                                    void* arg) noexcept nogil:
    """pthread_create with every signal blocked in the new thread (it inherits its
    creator's mask), so signals keep going to the Python main thread and never interrupt a
    worker. 0 or the errno value pthread_create returned."""
    cdef sigset_t all_signals
    cdef sigset_t old_mask
    cdef int rc
    sigfillset(&all_signals)
    pthread_sigmask(SIG_SETMASK, &all_signals, &old_mask)
    rc = pthread_create(thread, NULL, start, arg)
    pthread_sigmask(SIG_SETMASK, &old_mask, NULL)
    return rc
