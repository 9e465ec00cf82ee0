# cython: language_level=3
# Linux system interfaces used by the data plane (_relay_c.pyx), all callable without the GIL.
#
# Only the names we use are declared. Types declared here are hints to Cython: the C compiler
# sees the real definitions from the system headers (Python.h already defines _GNU_SOURCE,
# which splice(), pipe2() and F_SETPIPE_SZ need).

from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64

    # Packed on x86-64 in the real header; field access goes through the C definition.
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLPRI
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

    int eventfd(unsigned int initval, int flags)


cdef extern from "<fcntl.h>" nogil:
    ctypedef long long loff_t

    enum:
        F_GETFL
        F_SETFL
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK

    int fcntl(int fd, int cmd, ...)
    ssize_t splice(int fd_in, loff_t* off_in, int fd_out, loff_t* off_out, size_t length,
                   unsigned int flags)


cdef extern from "<unistd.h>" nogil:
    int pipe2(int* pipefd, int flags)
    int dup3(int oldfd, int newfd, int flags)
    int close(int fd)
    ssize_t read(int fd, void* buf, size_t count)
    ssize_t write(int fd, const void* buf, size_t count)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    cdef struct linger:
        int l_onoff
        int l_linger

    enum:
        SOL_SOCKET
        SO_ERROR
        SO_LINGER
        SHUT_WR
        MSG_OOB
        MSG_NOSIGNAL

    int shutdown(int sockfd, int how)
    ssize_t recv(int sockfd, void* buf, size_t length, int flags)
    ssize_t send(int sockfd, const void* buf, size_t length, int flags)
    # 1 when the next byte to read is the urgent mark (SIOCATMARK), 0 when not, -1 on error.
    int sockatmark(int sockfd)
    int getsockopt(int sockfd, int level, int optname, void* optval, socklen_t* optlen)
    int setsockopt(int sockfd, int level, int optname, const void* optval, socklen_t optlen)


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<linux/sockios.h>" nogil:
    enum:
        # Bytes of a TCP socket's send queue not yet acknowledged by the peer (sent or not).
        SIOCOUTQ


cdef extern from "<time.h>" nogil:
    ctypedef long time_t

    cdef struct timespec:
        time_t tv_sec
        long tv_nsec

    ctypedef int clockid_t

    enum:
        CLOCK_MONOTONIC_COARSE

    int clock_gettime(clockid_t clk_id, timespec* tp)


cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass

    enum:
        SIG_SETMASK

    int sigfillset(sigset_t* sigset)
    int pthread_sigmask(int how, const sigset_t* newset, sigset_t* oldset)


cdef extern from "<pthread.h>" nogil:
    # Opaque to Cython; only passed by value or by address.
    ctypedef unsigned long pthread_t

    ctypedef struct pthread_mutex_t:
        pass

    ctypedef struct pthread_attr_t:
        pass

    int pthread_create(pthread_t* thread, const pthread_attr_t* attr,
                       void* (*start_routine)(void*) noexcept nogil, void* arg)
    int pthread_join(pthread_t thread, void** retval)
    pthread_t pthread_self()
    int pthread_setname_np(pthread_t thread, const char* name)
    int pthread_mutex_init(pthread_mutex_t* mutex, const void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)


cdef extern from "relay_atomic.h" nogil:
    # Relaxed atomics on plain ints shared between the Python thread and the workers.
    int s6_load(int* p)
    void s6_add(int* p, int v)
