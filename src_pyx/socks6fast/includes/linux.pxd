# cython: language_level=3
# Linux system interfaces used by the data plane (_relay_c.pyx, _udp_c.pyx), all callable
# without the GIL.
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
        EPOLL_CTL_MOD
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


cdef extern from "<time.h>" nogil:
    ctypedef long time_t

    cdef struct timespec:
        time_t tv_sec
        long tv_nsec

    ctypedef int clockid_t

    enum:
        CLOCK_MONOTONIC
        CLOCK_MONOTONIC_COARSE

    int clock_gettime(clockid_t clk_id, timespec* tp)


cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void* iov_base
        size_t iov_len

    ssize_t writev(int fd, const iovec* iov, int iovcnt)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    ctypedef unsigned short sa_family_t

    cdef struct linger:
        int l_onoff
        int l_linger

    cdef struct sockaddr:
        sa_family_t sa_family

    cdef struct sockaddr_storage:
        sa_family_t ss_family

    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags

    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    cdef struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    enum:
        AF_INET
        AF_INET6
        SOL_SOCKET
        SO_ERROR
        SO_LINGER
        SO_DOMAIN
        SO_TYPE
        SOCK_DGRAM
        SO_ATTACH_REUSEPORT_CBPF
        SHUT_WR
        MSG_DONTWAIT
        MSG_TRUNC
        MSG_CTRUNC
        MSG_ERRQUEUE
        MSG_NOSIGNAL
        MSG_OOB
        MSG_PEEK

    # The CMSG_* macros, called like functions.
    cmsghdr* CMSG_FIRSTHDR(msghdr* msgh)
    cmsghdr* CMSG_NXTHDR(msghdr* msgh, cmsghdr* cmsg)
    unsigned char* CMSG_DATA(cmsghdr* cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

    int socket(int domain, int type, int protocol)
    int shutdown(int sockfd, int how)
    ssize_t recv(int sockfd, void* buf, size_t length, int flags)
    ssize_t send(int sockfd, const void* buf, size_t length, int flags)
    # 1 when the next byte to read is the urgent mark (SIOCATMARK), 0 when not, -1 on error.
    int sockatmark(int sockfd)
    int getsockopt(int sockfd, int level, int optname, void* optval, socklen_t* optlen)
    int setsockopt(int sockfd, int level, int optname, const void* optval, socklen_t optlen)
    int getsockname(int sockfd, sockaddr* addr, socklen_t* addrlen)
    int recvmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags, timespec* timeout)
    int sendmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags)
    ssize_t recvmsg(int sockfd, msghdr* msg, int flags)
    ssize_t sendmsg(int sockfd, const msghdr* msg, int flags)


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<linux/sockios.h>" nogil:
    enum:
        # Bytes of a TCP socket's send queue not yet acknowledged by the peer (sent or not).
        SIOCOUTQ


cdef extern from "<netinet/in.h>" nogil:
    ctypedef uint32_t in_addr_t

    cdef struct in_addr:
        in_addr_t s_addr

    cdef struct in6_addr:
        unsigned char s6_addr[16]

    cdef struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr

    cdef struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    cdef struct in_pktinfo:
        int ipi_ifindex
        in_addr ipi_spec_dst
        in_addr ipi_addr

    cdef struct in6_pktinfo:
        in6_addr ipi6_addr
        unsigned int ipi6_ifindex

    enum:
        IPPROTO_IP
        IPPROTO_IPV6
        IP_PKTINFO
        IP_RECVERR
        IPV6_V6ONLY
        IPV6_RECVERR
        IPV6_RECVPKTINFO
        IPV6_PKTINFO

    unsigned short htons(unsigned short x)
    unsigned short ntohs(unsigned short x)


cdef extern from *:
    """
    #include <netinet/udp.h>
    #ifndef SOL_UDP
    #define SOL_UDP 17
    #endif
    #ifndef UDP_SEGMENT
    #define UDP_SEGMENT 103  /* Linux 4.18: UDP GSO, the segment size of one send */
    #endif
    """
    enum:
        SOL_UDP
        UDP_SEGMENT


cdef extern from "<linux/errqueue.h>" nogil:
    cdef struct sock_extended_err:
        uint32_t ee_errno
        unsigned char ee_origin
        unsigned char ee_type
        unsigned char ee_code
        unsigned char ee_pad
        uint32_t ee_info
        uint32_t ee_data

    enum:
        SO_EE_ORIGIN_ICMP
        SO_EE_ORIGIN_ICMP6

    sockaddr* SO_EE_OFFENDER(sock_extended_err* ee)


cdef extern from "<linux/filter.h>" nogil:
    # Classic BPF, for SO_ATTACH_REUSEPORT_CBPF (steering a datagram to a worker's socket).
    cdef struct sock_filter:
        unsigned short code
        unsigned char jt
        unsigned char jf
        uint32_t k

    cdef struct sock_fprog:
        unsigned short len
        sock_filter* filter

    enum:
        BPF_LD
        BPF_B
        BPF_ABS
        BPF_ALU
        BPF_MOD
        BPF_K
        BPF_RET
        BPF_A


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
    int pthread_getcpuclockid(pthread_t thread, clockid_t* clock_id)
    int pthread_mutex_init(pthread_mutex_t* mutex, const void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)


cdef extern from "relay_atomic.h" nogil:
    # Relaxed atomics on plain ints shared between the Python thread and the workers.
    int s6_load(int* p)
    void s6_add(int* p, int v)
    void s6_store(int* p, int v)
    int s6_add_fetch(int* p, int v)
    long long s6_load64(long long* p)
    void s6_add64(long long* p, long long v)
    void s6_bump64(long long* p, long long v)
