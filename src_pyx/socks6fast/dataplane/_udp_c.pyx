# cython: language_level=3
"""The UDP data plane: SOCKS 6 and SOCKS 5 UDP associations relayed by C worker threads.

The control plane (Python) sets an association up (authentication, rules, Stack
options, the remote-facing sockets, the random Association ID) and hands it to a
:class:`UdpEngine`; from then on no Python code runs per datagram. Python API::

    engine = UdpEngine(workers=0, batch=16, max_datagram=65535, first_datagram_timeout=0.0,
                       hold_datagrams=8, hold_bytes=16384)
    engine.fileno() -> int     # readable (level) while events wait in drain()
    engine.add_port(fds)       # a client-facing UDP port (D16): one socket per worker
    engine.add(association_id, tcp_fd, remote_fds, socks5_fd=-1, client_address=None,
               client_port=0, udp_error=False, ask=False, tcp_send=b"", tcp_pending=b"")
    engine.verdict(association_id, address, port, allow)   # answers a UdpAsk
    engine.resolved(association_id, name, address_or_None) # answers a UdpResolve (D20)
    engine.remove(association_id)                          # end it now (SHUTDOWN)
    engine.add_channel(fd, dtls=None) -> int               # a client's own socket, maybe DTLS
    engine.remove_channel(channel)
    engine.drain() -> list[UdpConfirmed | UdpAsk | UdpResolve | UdpEnded | UdpChannelEnded
                           | UdpChannelHello]
    engine.drops() -> dict[UdpDrop, int]                   # engine-wide, per reason
    engine.held() -> tuple[int, int]                       # datagrams, bytes awaiting a verdict
    engine.active -> int; engine.workers -> int
    engine.close()

The events are the dataclasses of ``socks6fast.dataplane.udp_types`` (one definition
with the Python twin ``_udp_py``).

Strategy:

* N worker threads (default: half the usable cores, at least one, D33), each with its own epoll set,
  its wake eventfd and a preallocated arena: ``batch`` slots of ``32 + max_datagram``
  bytes with their ``mmsghdr``, ``iovec``, ``sockaddr`` and control-message space.
  Nothing is allocated per datagram.
* Associations live in one worker: the one named by the last byte of the
  Association ID modulo N. Its table (open addressing on the 8-byte ID, backward-shift
  deletion) and everything about the association are touched by that thread only;
  Python reaches it through the worker's mutex-protected inbox and command queue.
* A client-facing SOCKS 6 port is an SO_REUSEPORT group with one socket per worker;
  with several workers a classic BPF program (SO_ATTACH_REUSEPORT_CBPF, as the
  kernel selftest reuseport_bpf.c steers on payload bytes) sends each datagram to
  socket ``payload[11] % N``: byte 11 is the ID's last byte, so a datagram always
  reaches the worker that owns its association.
* Client -> remote: ``recvmmsg`` a batch; for each datagram ``parse_datagram_header``
  (the codec's GIL-free parser) reads the header in place; Message Length larger
  than the datagram drops it, padding after it is ignored (UDP-05); the ID is
  looked up; the first datagram fixes the mapping (UDP-03: the client's address and
  port, and the proxy's local address when the port is bound to a wildcard, read
  with IP_PKTINFO) and makes the engine write the Association Confirmation on the
  TCP connection (UDP-04); later datagrams that do not match it are dropped. The
  outgoing ``iovec`` points at the payload inside the receive buffer: it is never
  copied. Runs of datagrams for the same remote socket leave in one ``sendmmsg``.
* Remote -> client: ``recvmmsg`` into each slot 32 bytes after its start, so the
  Datagram Header (``write_datagram_header``, 20 or 32 bytes: the source is always
  an IP address, D20) is written in front of the payload in place and the message
  leaves as one contiguous buffer. Over UDP the messages of every remote socket that
  is ready in one epoll turn are queued (each names its own client) and leave in one
  ``sendmmsg`` per client-facing socket (this halved the sendmmsg calls of the
  8-flow echo benchmark); over TCP, one ``sendmsg`` with an ``iovec`` per message.
* UDP GSO (Linux 4.18, probed at start-up with ``setsockopt(UDP_SEGMENT)`` on a scratch
  socket; ``SOCKS6FAST_UDP_GSO=0`` turns it off): when a send run holds several
  datagrams from one association to one address, all of one size but the last, they
  leave as one message of several ``iovec`` s with a ``UDP_SEGMENT`` control message.
  The kernel builds, routes and hands on one packet and cuts it into the same
  datagrams (the NIC, the loopback receiver or software segmentation), instead of
  doing all of that once per datagram: the 8-flow echo benchmark went from about 11 to
  6-8 µs of proxy CPU per echo. A GSO send the kernel refuses (EIO: no checksum
  offload on the way; EINVAL: a segment above the path MTU, a socket without UDP
  checksums) is resent datagram by datagram, and that association (EIO: the worker)
  stops grouping. GRO is not used: datagrams are coalesced on receive only when they
  arrive as one GSO packet or through NIC GRO, which request/response traffic and the
  benchmark's senders do not produce.
* UDP over TCP: messages are framed by Message Length. Bytes read from the TCP
  connection are parsed in a worker buffer; only a partial message at the end is
  kept (copied) until its rest arrives. Towards the client, a message is written
  whole or not at all: if the socket would block the datagram is dropped (UDP
  semantics, ``UdpDrop.TCP_BLOCKED``), except the tail of a message the kernel took
  in part, which is kept and finished first (the stream must stay framed). The
  Confirmation and the bytes of ``tcp_send`` are never dropped.
* Destinations: each association has a small open-addressing table of (address,
  port) -> allow / deny / pending, plus "the client sent there". Without ``ask`` every
  destination is allowed; with it an unknown destination becomes pending and is
  reported once as ``UdpAsk`` until :meth:`verdict` answers. Domain names (D20) are
  resolved by the control plane (``UdpResolve`` / :meth:`resolved`) and cached per
  association; the rules see the resolved address. Datagrams to a pending
  destination or name are held (D24): copied into a FIFO per association, at most
  ``hold_datagrams`` and ``hold_bytes`` of payload (beyond: dropped, ``PENDING``),
  and when the verdict or the name arrives (a command the worker applies, like every
  other, on its own thread) they are sent in order, or dropped as ``DENIED``; the
  association's end frees them. A one-datagram exchange (DNS, NTP, a QUIC Initial)
  thus does not lose its first try. Remote datagrams reach the client only from a destination the
  client sent to, until the client's empty datagram to the all-zero address (UDP-06)
  opens the association to every source (server mode).
* SOCKS 5 (RFC 1928 section 7, D19): a per-association client-facing socket, the
  ``RSV RSV FRAG ATYP DST.ADDR DST.PORT`` header, FRAG other than 0 dropped, only
  the TCP client's address (and port, when the request named one) accepted.
* ICMP (UDP-09, D17): with ``udp_error`` the remote sockets get IP_RECVERR /
  IPV6_RECVERR; on EPOLLERR the worker reads the error queue (MSG_ERRQUEUE), maps
  the ICMP type/code with the table of ``udp_types`` and sends a Datagram Error
  message (the original destination, the reporter) on the mapped channel.
* Lifetime (UDP-07): the engine owns the TCP connection; its EOF or reset ends the
  association, and so does ``first_datagram_timeout`` without a first datagram. An
  ended association's sockets are closed at once; its struct and its report wait
  for the end of the worker's turn (later events of the same epoll batch may still
  name it), then move to the engine's event list, whose eventfd wakes the loop.
* Channels (issue 11; the contract is in ``socks6fast.dataplane.udp``): a socket
  connected to one client, its datagrams plaintext SOCKS 6 messages or DTLS records of
  a connection the control plane established. The worker calls OpenSSL's record layer
  through function pointers taken once from the library pyOpenSSL uses (see
  ``_openssl.pxd``): ``BIO_write`` the datagram (whole records only) and ``SSL_read``
  the plaintext into the receive slot, ``SSL_write`` + ``BIO_read`` each message to the
  client; what OpenSSL writes after a read (a retransmitted Finished's answer, an
  alert) is sent. One thread per SSL*: a channel starts in worker ``id % N`` and moves,
  with its first message, to the worker that owns the association it names, and carries
  every association of that worker whose first datagram arrives on it (D31, D32; see the
  section "Channels" below).
* Drops are counted per reason (``UdpDrop``) per worker and per association; no
  input can end a worker. Every epoll registration is level-triggered: a worker
  reads at most ``8 * batch`` datagrams from one socket per turn (fairness), and
  whatever is left makes epoll report the socket again.
"""

from libc.errno cimport (
    EAGAIN,
    ECONNREFUSED,
    ECONNRESET,
    EHOSTDOWN,
    EHOSTUNREACH,
    EINTR,
    EIO,
    ENETDOWN,
    ENETUNREACH,
    EPIPE,
    errno,
)
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

from socks6fast.dataplane._engine cimport (
    clear_fd,
    monotonic_ms,
    open_worker_loop,
    start_worker_thread,
    wake_fd,
)
from socks6fast.dataplane._openssl cimport (
    SSL_ERROR_WANT_READ,
    OpenSSLApi,
    bio_read_t,
    bio_write_t,
    err_clear_error_t,
    ssl_get_error_t,
    ssl_read_t,
    ssl_shutdown_t,
    ssl_write_t,
)
from socks6fast.includes.linux cimport (
    AF_INET,
    AF_INET6,
    BPF_A,
    BPF_ABS,
    BPF_ALU,
    BPF_B,
    BPF_K,
    BPF_LD,
    BPF_MOD,
    BPF_RET,
    CMSG_DATA,
    CMSG_FIRSTHDR,
    CMSG_LEN,
    CMSG_NXTHDR,
    CMSG_SPACE,
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EPOLL_CTL_MOD,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
    F_GETFL,
    F_SETFL,
    IP_PKTINFO,
    IP_RECVERR,
    IPPROTO_IP,
    IPPROTO_IPV6,
    IPV6_PKTINFO,
    IPV6_RECVERR,
    IPV6_RECVPKTINFO,
    IPV6_V6ONLY,
    MSG_DONTWAIT,
    MSG_ERRQUEUE,
    MSG_NOSIGNAL,
    MSG_TRUNC,
    O_NONBLOCK,
    SO_ATTACH_REUSEPORT_CBPF,
    SO_DOMAIN,
    SO_EE_OFFENDER,
    SO_ERROR,
    SO_EE_ORIGIN_ICMP,
    SO_EE_ORIGIN_ICMP6,
    SO_TYPE,
    SOCK_DGRAM,
    SOL_SOCKET,
    SOL_UDP,
    UDP_SEGMENT,
    close,
    cmsghdr,
    socket as c_socket,
    epoll_ctl,
    epoll_event,
    epoll_wait,
    eventfd,
    fcntl,
    getsockname,
    getsockopt,
    in6_pktinfo,
    in_pktinfo,
    iovec,
    mmsghdr,
    msghdr,
    ntohs,
    htons,
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
    recvmmsg,
    recvmsg,
    sendmmsg,
    send,
    sendmsg,
    setsockopt,
    sock_extended_err,
    sock_filter,
    sock_fprog,
    sockaddr,
    sockaddr_in,
    sockaddr_in6,
    sockaddr_storage,
    socklen_t,
    write,
)
from socks6fast.proto._codec_c cimport (
    DGRAM_ADDRESS_OFFSET,
    DGRAM_E_ADDRESS_TYPE,
    DGRAM_E_TRUNCATED,
    DatagramHeaderView,
    parse_datagram_header,
    write_datagram_header,
)

import os
import socket

from socks6fast.constants import RelayEnd, UdpDrop
from socks6fast.dataplane.udp_types import (
    ICMP6_ERROR_CODES,
    ICMP_ERROR_CODES,
    DTLSLink,
    UdpAsk,
    UdpChannelEnded,
    UdpChannelHello,
    UdpConfirmed,
    UdpEnded,
    UdpResolve,
    default_workers,
)

# RelayEnd values as C constants (constants.py holds the one definition; the
# module-level check below and tests/test_udp_engine.py keep them in step).
cdef enum:
    END_EOF = 0
    END_RESET = 1
    END_IDLE = 2
    END_ERROR = 3
    END_SHUTDOWN = 4
    END_LIVE = -1

# UdpDrop values as C constants (same rule).
cdef enum:
    D_MALFORMED = 0
    D_TRUNCATED = 1
    D_ADDRESS_TYPE = 2
    D_LENGTH = 3
    D_UNKNOWN_ASSOCIATION = 4
    D_MAPPING = 5
    D_SOURCE = 6
    D_FRAGMENT = 7
    D_DENIED = 8
    D_PENDING = 9
    D_NO_SOCKET = 10
    D_SEND_FAILED = 11
    D_TCP_BLOCKED = 12
    D_UNCONFIRMED = 13
    D_FILTERED = 14
    D_TOO_BIG = 15
    D_TABLE_FULL = 16
    D_RECORD = 17  # a channel's datagram with no valid DTLS application record
    D_NO_CHANNEL = 18
    NDROPS = 19

cdef enum:
    EP_PORT = 1     # a SOCKS 6 client-facing port socket (shared by associations)
    EP_S5 = 2       # a SOCKS 5 association's client-facing socket
    EP_REMOTE = 3   # a remote-facing socket
    EP_TCP = 4      # the association's TCP connection
    EP_CHANNEL = 5  # a channel (add_channel): a socket connected to one client, maybe DTLS

cdef enum:
    ST_UNMAPPED = 0
    ST_UDP = 1      # mapped to a UDP 5-tuple
    ST_TCP = 2      # mapped to the TCP connection (UDP over TCP)
    ST_CHANNEL = 3  # mapped to a channel (a DTLS connection); it may have ended first (D28)

cdef enum:
    V_ALLOW = 1
    V_DENY = 2
    V_PENDING = 3

cdef enum:
    N_PENDING = 1
    N_RESOLVED = 2
    N_FAILED = 3

cdef enum:
    EV_CONFIRMED = 1
    EV_ASK = 2
    EV_RESOLVE = 3
    EV_ENDED = 4
    EV_CHANNEL_ENDED = 5
    EV_CHANNEL_HELLO = 6

cdef enum:
    CMD_VERDICT = 1
    CMD_RESOLVED = 2
    CMD_REMOVE = 3
    CMD_REMOVE_CHANNEL = 4

cdef enum:
    HEADROOM = 32           # largest Datagram Header the engine writes (IPv6 source)
    MAX_REMOTES = 4
    MAX_PORTS = 64
    MAX_BATCH = 256
    MAX_EVENTS = 256
    PORT_ROUNDS = 8         # recvmmsg batches per socket per turn (fairness)
    MAX_DESTS = 4096        # destinations per association
    MAX_NAMES = 64          # cached domain names per association (D20)
    HOLD_DATAGRAMS = 8      # default: datagrams held per association awaiting a verdict (D24)
    HOLD_BYTES = 16384      # default: their payload bytes
    MAX_HOLD_DATAGRAMS = 256
    MAX_HOLD_BYTES = 1048576
    CTL_SIZE = 128          # control-message space per slot (one in6_pktinfo)
    ERRQ_CTL_SIZE = 512
    TCP_CHUNK = 65536       # bytes read from a TCP connection at a time
    MAX_MESSAGE = 65535     # Message Length is 16 bits
    MAX_WORKERS = 64
    ICMP_TABLE_MAX = 32
    # UDP GSO (UDP_SEGMENT): at most 64 segments (UDP_MAX_SEGMENTS before Linux 6.9) and
    # one IP packet's worth of bytes per send.
    GSO_MAX_SEGS = 64
    GSO_MAX_BYTES = 60000
    GCTL_SIZE = 64          # a group's control space: an in6_pktinfo and the UDP_SEGMENT size
    # SOCKS 6 UDP association messages (section "Handling UDP ASSOCIATE").
    S6_VERSION = 6
    S6_CONFIRMATION = 2
    S6_DATAGRAM = 3
    S6_ERROR = 4
    S6_ASSOC_HEADER = 12    # Version, Type, Message Length, Association ID
    S6_MIN_MESSAGE = 12
    ATYP_IPV4 = 1
    ATYP_DOMAIN = 3
    ATYP_IPV6 = 4
    # DTLS records (RFC 6347 section 4.1): a 13-byte header; content types 20-25.
    DTLS_HEADER = 13
    DTLS_MAX_BODY = 18432   # 2^14 + 2048
    CT_CHANGE_CIPHER_SPEC = 20
    CT_HANDSHAKE = 22
    CT_APPLICATION_DATA = 23
    HS_CLIENT_HELLO = 1
    MAX_HELLO = 4096        # a ClientHello datagram passed on to the control plane (D31)
    MAX_HELLOS = 256        # ... at most this many waiting for drain(); beyond: dropped (RECORD)
    CT_MAX = 25
    DTLS_BUF = 65536        # records OpenSSL wrote (one flight, or one record per message)


cdef struct Assoc  # forward declarations
cdef struct Channel
cdef struct Worker
cdef struct Engine


cdef struct Endpoint:
    int kind
    int fd
    int family          # AF_INET or AF_INET6
    bint v6only         # AF_INET6 only: IPv4 destinations need an AF_INET socket
    bint wildcard       # bound to 0.0.0.0 / ::, so replies name their source with IP_PKTINFO
    Assoc* assoc        # NULL for EP_PORT and EP_CHANNEL
    Channel* channel    # EP_CHANNEL only


cdef struct Dest:
    unsigned char used
    unsigned char verdict
    unsigned char contacted  # the client sent a datagram there (replies may come back)
    unsigned char family     # 4 or 6
    unsigned int port
    unsigned char addr[16]


cdef struct Held:
    # A client datagram waiting for its destination's verdict or name (D24): a copy of
    # the payload and of the destination as the client named it, in one allocation
    # (the struct, then address_length address bytes, then plen payload bytes).
    Held* next
    size_t plen
    unsigned int atyp
    unsigned int port
    Py_ssize_t address_length


cdef struct Name:
    unsigned char length
    unsigned char state
    unsigned char family
    unsigned char addr[16]
    unsigned char name[255]


cdef struct Assoc:
    unsigned char aid[8]
    uint64_t key
    Worker* worker
    int reason              # END_LIVE, then a RelayEnd value
    char cause[112]
    bint socks5
    bint udp_error
    bint ask
    int state
    bint server_mode
    bint in_table
    bint no_gso             # a GSO send of this association failed: send its datagrams one by one
    Endpoint tcp
    Endpoint s5
    Endpoint remote[MAX_REMOTES]
    int nremote
    # The mapping (UDP-03): the channel, the client's address and the proxy's.
    Endpoint* map_ep
    Channel* chan           # ST_CHANNEL: its channel, NULL once that ended (D28)
    Assoc* chan_prev        # the other associations the channel carries (D32)
    Assoc* chan_next
    sockaddr_storage client
    socklen_t client_len
    unsigned char client_family
    unsigned char client_addr[16]
    unsigned int client_port
    bint has_local
    unsigned char local_family
    unsigned char local_addr[16]
    int local_ifindex
    # Accepted client address (SOCKS 5: the TCP client's, D19); family 0 = any.
    unsigned char want_family
    unsigned char want_addr[16]
    unsigned int want_port
    # UDP over TCP.
    unsigned char* rx       # a partial message carried to the next read
    size_t rx_len
    unsigned char* tx       # bytes that must reach the client before any new message
    size_t tx_len
    size_t tx_off
    size_t tx_cap
    bint out_armed          # EPOLLOUT is in the TCP registration
    # Destinations and names.
    Dest* dests
    unsigned int dcap
    unsigned int dcount
    Name* names
    int nnames
    # Datagrams waiting for a verdict or a name (D24): a FIFO, bounded per association.
    Held* held_head
    Held* held_tail
    unsigned int held_count
    size_t held_bytes
    # Counters.
    uint64_t c2r_dgrams
    uint64_t c2r_bytes
    uint64_t r2c_dgrams
    uint64_t r2c_bytes
    uint64_t drops
    uint64_t icmp_errors
    uint64_t icmp_reported
    # First-datagram timeout (UDP-07): FIFO of unmapped associations.
    int64_t deadline_ms
    bint waiting
    Assoc* wait_prev
    Assoc* wait_next
    Assoc* next             # inbox / teardown lists


cdef struct Channel:
    # A socket connected to one client 5-tuple (add_channel, issue 11): plaintext SOCKS 6
    # messages, or DTLS records of an established connection whose SSL* this struct uses.
    int id
    Endpoint ep             # kind EP_CHANNEL
    void* ssl               # SSL*, NULL for a plaintext channel
    void* rbio              # the Connection's memory BIOs: records in,
    void* wbio              # records out
    int mtu                 # largest datagram of records sent
    int limit               # largest message sent (DTLS: plaintext of one record within mtu)
    unsigned char peer_family
    unsigned char peer_addr[16]
    unsigned int peer_port
    Assoc* assocs           # the associations mapped to it (all of this worker, D32), NULL before
    int nassocs
    uint64_t datagrams_in
    uint64_t datagrams_out
    uint64_t drops
    bint ended
    char cause[112]
    # Under Engine.lock (Python and the workers): which worker houses it (or is about to),
    # whether remove_channel asked for its end.
    int owner
    bint remove_requested
    # Worker-local: the worker's list of channels, and the unmapped ones by deadline.
    bint listed
    Channel* wprev
    Channel* wnext
    bint waiting
    int64_t deadline_ms
    Channel* cwprev
    Channel* cwnext
    Channel* next           # a worker's inbox
    # A message handed over with the channel to its association's worker (migration).
    unsigned char* pending
    size_t pending_len


cdef struct Cmd:
    int kind
    int channel_id          # CMD_REMOVE_CHANNEL
    unsigned char aid[8]
    unsigned char family    # 4 or 6; 0 = a name that did not resolve
    unsigned char addr[16]
    unsigned int port
    bint allow
    unsigned char name_len
    unsigned char name[255]
    Cmd* next


cdef struct Event:
    int kind
    unsigned char aid[8]
    unsigned char family
    unsigned char addr[16]
    unsigned int port
    unsigned char name_len
    unsigned char name[255]
    bint over_tcp
    bint server_mode
    Assoc* assoc            # EV_ENDED: the ended association, freed by drain()
    Channel* channel        # EV_CHANNEL_ENDED: the ended channel, freed by drain()
    int channel_id          # EV_CONFIRMED: the channel mapped to, -1 for none; EV_CHANNEL_HELLO
    unsigned char* data     # EV_CHANNEL_HELLO: a copy of the datagram (freed with the event)
    size_t data_len
    Event* next


cdef struct Slot:
    sockaddr_storage peer   # recvmmsg: the datagram's source
    sockaddr_storage dst    # client -> remote: where the payload goes
    unsigned char ctl[CTL_SIZE]
    iovec iov
    unsigned char* buf      # HEADROOM bytes, then up to max_datagram received bytes


cdef struct Worker:
    Engine* engine
    int index
    pthread_t thread
    bint started
    int epfd
    int wakefd
    pthread_mutex_t lock    # guards inbox, cmds, stop
    Assoc* inbox
    Channel* chan_inbox     # channels added, or handed over by another worker
    Cmd* cmds
    bint stop
    # Everything below is touched by the worker thread only (and by teardown after join).
    Assoc** table
    unsigned int tcap
    unsigned int tcount
    Assoc* wait_head
    Assoc* wait_tail
    Channel* chans          # the channels this worker houses
    Channel* cwait_head     # the unmapped ones, by deadline
    Channel* cwait_tail
    unsigned char* dtlsout  # DTLS_BUF: records OpenSSL wrote, on their way out
    unsigned char* dtlsin   # DTLS_BUF: plaintext read after a hand-over
    Event* ev_head
    Event* ev_tail
    int nended
    Slot* slots
    unsigned char* arena
    mmsghdr* rx
    mmsghdr* tx
    int* txfd
    Assoc** txowner
    unsigned int* txpay
    int ntx                 # client -> remote messages queued in tx (flush_remote)
    int ctx                 # remote -> client messages queued in tx (flush_client)
    int cslot               # arena slots [0, cslot) hold the queued remote -> client messages
    # UDP GSO: a run of queued messages (one socket) regrouped for sendmmsg, where runs of
    # equal-sized datagrams from one association to one address become one message.
    bint gso
    mmsghdr* gtx
    iovec* giov
    int* gfirst             # per group: its first message in tx
    int* gcount             # per group: how many messages
    unsigned char* gctl     # per group: GCTL_SIZE bytes of control space
    unsigned char* tcpbuf   # 2 * TCP_CHUNK: a carried partial message, then a read
    sockaddr_storage eq_name
    unsigned char eq_ctl[ERRQ_CTL_SIZE]
    unsigned char eq_buf[64]
    unsigned char emsg[64]  # a Datagram Error message being sent
    uint64_t drops[NDROPS]
    int64_t held_count      # datagrams held by this worker's associations (D24)
    int64_t held_bytes
    int64_t now_ms
    Endpoint* ports[MAX_PORTS]
    int nports


cdef struct Engine:
    Worker* workers
    int nworkers
    int batch
    int max_datagram
    bint gso                # the kernel takes UDP_SEGMENT (probed at start-up)
    unsigned int hold_datagrams  # per association, waiting for a verdict or a name (D24)
    size_t hold_bytes
    int64_t first_ms        # first-datagram timeout, 0 = none
    int donefd
    pthread_mutex_t lock    # guards done_head/done_tail/active
    Event* done_head
    Event* done_tail
    int active
    int hellos              # EV_CHANNEL_HELLO events not drained yet (at most MAX_HELLOS)
    uint64_t final_drops[NDROPS]  # the workers' counters, summed when they are released


# ICMP (type, code) -> Datagram Error code, filled at import from udp_types (one
# definition): code -1 matches any code of the type.
cdef int ICMP4_TYPE[ICMP_TABLE_MAX]
cdef int ICMP4_CODE[ICMP_TABLE_MAX]
cdef int ICMP4_RESULT[ICMP_TABLE_MAX]
cdef int ICMP4_N = 0
cdef int ICMP6_TYPE[ICMP_TABLE_MAX]
cdef int ICMP6_CODE[ICMP_TABLE_MAX]
cdef int ICMP6_RESULT[ICMP_TABLE_MAX]
cdef int ICMP6_N = 0


def _load_icmp_tables():
    global ICMP4_N, ICMP6_N
    ICMP4_N = 0
    for (icmp_type, icmp_code), result in ICMP_ERROR_CODES.items():
        ICMP4_TYPE[ICMP4_N] = icmp_type
        ICMP4_CODE[ICMP4_N] = -1 if icmp_code is None else icmp_code
        ICMP4_RESULT[ICMP4_N] = int(result)
        ICMP4_N += 1
    ICMP6_N = 0
    for (icmp_type, icmp_code), result in ICMP6_ERROR_CODES.items():
        ICMP6_TYPE[ICMP6_N] = icmp_type
        ICMP6_CODE[ICMP6_N] = -1 if icmp_code is None else icmp_code
        ICMP6_RESULT[ICMP6_N] = int(result)
        ICMP6_N += 1


_load_icmp_tables()

_END_MEMBERS = tuple(sorted(RelayEnd, key=int))
_DROP_MEMBERS = tuple(sorted(UdpDrop, key=int))
if len(_DROP_MEMBERS) != NDROPS or [int(m) for m in _DROP_MEMBERS] != list(range(NDROPS)):
    raise ImportError("socks6fast.dataplane._udp_c: UdpDrop does not match the engine's drop reasons")
if [int(m) for m in _END_MEMBERS] != [END_EOF, END_RESET, END_IDLE, END_ERROR, END_SHUTDOWN]:
    raise ImportError("socks6fast.dataplane._udp_c: RelayEnd does not match the engine's end reasons")


cdef void strcpy_cause(char* out, const char* cause) noexcept nogil:
    cdef int i = 0
    while cause[i] != 0 and i < 111:
        out[i] = cause[i]
        i += 1
    out[i] = 0


cdef int icmp_lookup(bint v6, int icmp_type, int icmp_code) noexcept nogil:
    cdef int i
    cdef int best = 0
    if v6:
        for i in range(ICMP6_N):
            if ICMP6_TYPE[i] == icmp_type:
                if ICMP6_CODE[i] == icmp_code:
                    return ICMP6_RESULT[i]
                if ICMP6_CODE[i] < 0:
                    best = ICMP6_RESULT[i]
    else:
        for i in range(ICMP4_N):
            if ICMP4_TYPE[i] == icmp_type:
                if ICMP4_CODE[i] == icmp_code:
                    return ICMP4_RESULT[i]
                if ICMP4_CODE[i] < 0:
                    best = ICMP4_RESULT[i]
    return best


# ---------------------------------------------------------------------------
# Small helpers (worker thread, no GIL)

cdef inline unsigned int get_u16(const unsigned char* p) noexcept nogil:
    return (<unsigned int>p[0] << 8) | p[1]


cdef inline void put_u16(unsigned char* p, unsigned int v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>(v & 0xFF)


cdef inline uint64_t id_key(const unsigned char* aid) noexcept nogil:
    cdef uint64_t k
    # The 8 ID bytes as one integer (byte order does not matter for a hash key).
    memcpy(&k, aid, 8)
    return k


cdef inline uint64_t mix64(uint64_t k) noexcept nogil:
    # MurmurHash3's finaliser: IDs are random (D18), but a control plane may choose
    # its own; mixing keeps the probe sequences short either way.
    k ^= k >> 33
    k *= <uint64_t>0xff51afd7ed558ccd
    k ^= k >> 33
    return k


cdef inline bint is_v4_mapped(const unsigned char* a) noexcept nogil:
    cdef int i
    for i in range(10):
        if a[i] != 0:
            return False
    return a[10] == 0xFF and a[11] == 0xFF


cdef inline bint all_zero(const unsigned char* a, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        if a[i] != 0:
            return False
    return True


cdef bint sa_key(const sockaddr_storage* ss, unsigned char* family, unsigned char* addr,
                 unsigned int* port) noexcept nogil:
    """Normalise a socket address to (4 or 6, address bytes, port); IPv4-mapped -> 4."""
    cdef const sockaddr_in* sin
    cdef const sockaddr_in6* sin6
    memset(addr, 0, 16)
    if ss.ss_family == AF_INET:
        # Cast: the storage holds a sockaddr_in (ss_family says so).
        sin = <const sockaddr_in*>ss
        family[0] = 4
        memcpy(addr, &sin.sin_addr, 4)
        port[0] = ntohs(sin.sin_port)
        return True
    if ss.ss_family == AF_INET6:
        # Cast: the storage holds a sockaddr_in6.
        sin6 = <const sockaddr_in6*>ss
        if is_v4_mapped(sin6.sin6_addr.s6_addr):
            family[0] = 4
            memcpy(addr, sin6.sin6_addr.s6_addr + 12, 4)
        else:
            family[0] = 6
            memcpy(addr, sin6.sin6_addr.s6_addr, 16)
        port[0] = ntohs(sin6.sin6_port)
        return True
    return False


cdef socklen_t make_sa(sockaddr_storage* ss, int sock_family, unsigned char family,
                       const unsigned char* addr, unsigned int port) noexcept nogil:
    """Fill ss for a socket of sock_family (an IPv4 address on AF_INET6 becomes IPv4-mapped)."""
    cdef sockaddr_in* sin
    cdef sockaddr_in6* sin6
    memset(ss, 0, sizeof(sockaddr_in6))
    if sock_family == AF_INET:
        # Cast: writing a sockaddr_in into the storage.
        sin = <sockaddr_in*>ss
        sin.sin_family = AF_INET
        sin.sin_port = htons(<unsigned short>port)
        memcpy(&sin.sin_addr, addr, 4)
        return sizeof(sockaddr_in)
    # Cast: writing a sockaddr_in6 into the storage.
    sin6 = <sockaddr_in6*>ss
    sin6.sin6_family = AF_INET6
    sin6.sin6_port = htons(<unsigned short>port)
    if family == 4:
        sin6.sin6_addr.s6_addr[10] = 0xFF
        sin6.sin6_addr.s6_addr[11] = 0xFF
        memcpy(sin6.sin6_addr.s6_addr + 12, addr, 4)
    else:
        memcpy(sin6.sin6_addr.s6_addr, addr, 16)
    return sizeof(sockaddr_in6)


cdef inline void count_drop(Worker* w, Assoc* a, int reason) noexcept nogil:
    w.drops[reason] += 1
    if a != NULL:
        a.drops += 1


cdef Event* new_event(Worker* w, int kind, const unsigned char* aid) noexcept nogil:
    """Append an event to this turn's list; NULL (event lost) only when out of memory."""
    cdef Event* ev = <Event*>calloc(1, sizeof(Event))
    if ev == NULL:
        return NULL
    ev.kind = kind
    memcpy(ev.aid, aid, 8)
    if w.ev_tail != NULL:
        w.ev_tail.next = ev
    else:
        w.ev_head = ev
    w.ev_tail = ev
    return ev


# ---------------------------------------------------------------------------
# The association table (per worker, open addressing on the ID)

cdef Assoc* table_find(Worker* w, uint64_t key) noexcept nogil:
    cdef unsigned int mask
    cdef unsigned int i
    if w.tcap == 0:
        return NULL
    mask = w.tcap - 1
    i = <unsigned int>(mix64(key) & mask)
    while w.table[i] != NULL:
        if w.table[i].key == key:
            return w.table[i]
        i = (i + 1) & mask
    return NULL


cdef bint table_grow(Worker* w) noexcept nogil:
    cdef unsigned int cap = w.tcap * 2 if w.tcap else 64
    cdef Assoc** old = w.table
    cdef unsigned int oldcap = w.tcap
    cdef unsigned int i
    cdef unsigned int j
    # calloc: every slot starts empty (NULL).
    cdef Assoc** grown = <Assoc**>calloc(cap, sizeof(Assoc*))
    if grown == NULL:
        return False
    for i in range(oldcap):
        if old[i] != NULL:
            j = <unsigned int>(mix64(old[i].key) & (cap - 1))
            while grown[j] != NULL:
                j = (j + 1) & (cap - 1)
            grown[j] = old[i]
    w.table = grown
    w.tcap = cap
    free(old)
    return True


cdef bint table_insert(Worker* w, Assoc* a) noexcept nogil:
    cdef unsigned int i
    if (w.tcount + 1) * 2 > w.tcap and not table_grow(w):
        return False
    i = <unsigned int>(mix64(a.key) & (w.tcap - 1))
    while w.table[i] != NULL:
        i = (i + 1) & (w.tcap - 1)
    w.table[i] = a
    w.tcount += 1
    a.in_table = True
    return True


cdef void table_remove(Worker* w, Assoc* a) noexcept nogil:
    cdef unsigned int mask
    cdef unsigned int i
    cdef unsigned int j
    cdef unsigned int home
    if not a.in_table:
        return
    a.in_table = False
    mask = w.tcap - 1
    i = <unsigned int>(mix64(a.key) & mask)
    while w.table[i] != a:
        i = (i + 1) & mask
    w.table[i] = NULL
    w.tcount -= 1
    # Backward-shift deletion: move later entries of the probe run into the hole when
    # their home slot does not lie (cyclically) between the hole and them.
    j = i
    while True:
        j = (j + 1) & mask
        if w.table[j] == NULL:
            return
        home = <unsigned int>(mix64(w.table[j].key) & mask)
        if ((j - home) & mask) >= ((j - i) & mask):
            w.table[i] = w.table[j]
            w.table[j] = NULL
            i = j


# ---------------------------------------------------------------------------
# Destinations (per association): verdicts and "the client sent there"

cdef inline unsigned int dest_hash(unsigned char family, const unsigned char* addr,
                                   unsigned int port) noexcept nogil:
    # FNV-1a over the key bytes.
    cdef unsigned int h = 2166136261u
    cdef int i
    cdef int n = 4 if family == 4 else 16
    h = (h ^ family) * 16777619u
    h = (h ^ (port & 0xFF)) * 16777619u
    h = (h ^ (port >> 8)) * 16777619u
    for i in range(n):
        h = (h ^ addr[i]) * 16777619u
    return h


cdef Dest* dest_find(Assoc* a, unsigned char family, const unsigned char* addr,
                     unsigned int port) noexcept nogil:
    cdef unsigned int mask
    cdef unsigned int i
    cdef Dest* d
    if a.dcap == 0:
        return NULL
    mask = a.dcap - 1
    i = dest_hash(family, addr, port) & mask
    while a.dests[i].used:
        d = &a.dests[i]
        if d.family == family and d.port == port and memcmp(d.addr, addr, 16) == 0:
            return d
        i = (i + 1) & mask
    return NULL


cdef Dest* dest_add(Assoc* a, unsigned char family, const unsigned char* addr, unsigned int port,
                    unsigned char verdict) noexcept nogil:
    """Insert a destination known to be absent; NULL when the table is full or out of memory."""
    cdef unsigned int cap
    cdef unsigned int i
    cdef unsigned int j
    cdef Dest* grown
    cdef Dest* d
    if a.dcount >= MAX_DESTS:
        return NULL
    if (a.dcount + 1) * 2 > a.dcap:
        cap = a.dcap * 2 if a.dcap else 8
        # calloc: every entry starts unused.
        grown = <Dest*>calloc(cap, sizeof(Dest))
        if grown == NULL:
            return NULL
        for i in range(a.dcap):
            if a.dests[i].used:
                j = dest_hash(a.dests[i].family, a.dests[i].addr, a.dests[i].port) & (cap - 1)
                while grown[j].used:
                    j = (j + 1) & (cap - 1)
                grown[j] = a.dests[i]
        free(a.dests)
        a.dests = grown
        a.dcap = cap
    i = dest_hash(family, addr, port) & (a.dcap - 1)
    while a.dests[i].used:
        i = (i + 1) & (a.dcap - 1)
    d = &a.dests[i]
    d.used = 1
    d.verdict = verdict
    d.contacted = 0
    d.family = family
    d.port = port
    memcpy(d.addr, addr, 16)
    a.dcount += 1
    return d


cdef Name* name_find(Assoc* a, const unsigned char* name, Py_ssize_t length) noexcept nogil:
    cdef int i
    for i in range(a.nnames):
        if a.names[i].length == length and memcmp(a.names[i].name, name, <size_t>length) == 0:
            return &a.names[i]
    return NULL


cdef Name* name_add(Assoc* a, const unsigned char* name, Py_ssize_t length) noexcept nogil:
    cdef Name* n
    if a.nnames >= MAX_NAMES or length < 1 or length > 255:
        return NULL
    if a.names == NULL:
        # One array of MAX_NAMES entries, allocated on the first name.
        a.names = <Name*>calloc(MAX_NAMES, sizeof(Name))
        if a.names == NULL:
            return NULL
    n = &a.names[a.nnames]
    a.nnames += 1
    memset(n, 0, sizeof(Name))
    n.length = <unsigned char>length
    memcpy(n.name, name, <size_t>length)
    n.state = N_PENDING
    return n


# ---------------------------------------------------------------------------
# The TCP connection: control bytes and framed messages towards the client

cdef void tcp_arm(Worker* w, Assoc* a, bint want_out) noexcept nogil:
    cdef epoll_event ev
    if a.out_armed == want_out or a.tcp.fd < 0:
        return
    ev.events = EPOLLIN | EPOLLRDHUP | (EPOLLOUT if want_out else 0)
    # The event carries the Endpoint (void* in the epoll union).
    ev.data.ptr = <void*>&a.tcp
    epoll_ctl(w.epfd, EPOLL_CTL_MOD, a.tcp.fd, &ev)
    a.out_armed = want_out


cdef bint tx_append(Assoc* a, const unsigned char* data, size_t n) noexcept nogil:
    """Keep bytes that must reach the client before anything else; False if out of memory."""
    cdef size_t need
    cdef size_t cap
    cdef unsigned char* grown
    if a.tx_off == a.tx_len:
        a.tx_off = 0
        a.tx_len = 0
    need = a.tx_len + n
    if need > a.tx_cap:
        cap = a.tx_cap * 2 if a.tx_cap else 256
        while cap < need:
            cap *= 2
        # realloc returns void*: the buffer holds bytes.
        grown = <unsigned char*>realloc(a.tx, cap)
        if grown == NULL:
            return False
        a.tx = grown
        a.tx_cap = cap
    memcpy(a.tx + a.tx_len, data, n)
    a.tx_len += n
    return True


cdef void tcp_flush(Worker* w, Assoc* a) noexcept nogil:
    """Write the kept bytes; EPOLLOUT stays armed until they are all out."""
    cdef ssize_t n
    cdef msghdr m
    cdef iovec v
    while a.tx_off < a.tx_len:
        v.iov_base = a.tx + a.tx_off
        v.iov_len = a.tx_len - a.tx_off
        memset(&m, 0, sizeof(m))
        m.msg_iov = &v
        m.msg_iovlen = 1
        # sendmsg, not write: MSG_NOSIGNAL (a reset peer gives EPIPE, not SIGPIPE).
        n = sendmsg(a.tcp.fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT)
        if n > 0:
            a.tx_off += <size_t>n
        elif n < 0 and errno == EINTR:
            continue
        elif n < 0 and errno == EAGAIN:
            tcp_arm(w, a, True)
            return
        else:
            end_assoc(w, a, END_RESET if errno == ECONNRESET or errno == EPIPE else END_ERROR,
                      b"write to the TCP connection failed")
            return
    a.tx_off = 0
    a.tx_len = 0
    tcp_arm(w, a, False)


cdef void tcp_send_control(Worker* w, Assoc* a, const unsigned char* data, size_t n) noexcept nogil:
    """Bytes that are never dropped (the Confirmation, tcp_send): kept until written."""
    if not tx_append(a, data, n):
        end_assoc(w, a, END_ERROR, b"out of memory")
        return
    tcp_flush(w, a)


cdef void tcp_send_messages(Worker* w, Assoc* a, iovec* v, unsigned int* pay, int n) noexcept nogil:
    """Write whole messages to the TCP connection; drop those that would block.

    The kernel may take part of one message: its tail is kept and written first
    (the stream must stay framed); the messages after it are dropped.
    """
    cdef msghdr m
    cdef ssize_t r
    cdef size_t done
    cdef int i
    if n <= 0:
        return
    if a.tx_off < a.tx_len:
        # Earlier bytes still wait for EPOLLOUT: UDP semantics, drop rather than buffer.
        for i in range(n):
            count_drop(w, a, D_TCP_BLOCKED)
        return
    memset(&m, 0, sizeof(m))
    m.msg_iov = v
    m.msg_iovlen = <size_t>n
    while True:
        r = sendmsg(a.tcp.fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT)
        if r < 0 and errno == EINTR:
            continue
        break
    if r < 0:
        if errno == EAGAIN:
            for i in range(n):
                count_drop(w, a, D_TCP_BLOCKED)
            tcp_arm(w, a, True)
            return
        end_assoc(w, a, END_RESET if errno == ECONNRESET or errno == EPIPE else END_ERROR,
                  b"write to the TCP connection failed")
        return
    done = <size_t>r
    for i in range(n):
        if done >= v[i].iov_len:
            done -= v[i].iov_len
            a.r2c_dgrams += 1
            a.r2c_bytes += pay[i]
        elif done > 0:
            # Cast: iov_base is the message's bytes; keep the part the kernel did not take.
            if not tx_append(a, <unsigned char*>v[i].iov_base + done, v[i].iov_len - done):
                end_assoc(w, a, END_ERROR, b"out of memory")
                return
            a.r2c_dgrams += 1
            a.r2c_bytes += pay[i]
            done = 0
            tcp_arm(w, a, True)
        else:
            count_drop(w, a, D_TCP_BLOCKED)


# ---------------------------------------------------------------------------
# Mapping, confirmation, ending

cdef void wait_remove(Worker* w, Assoc* a) noexcept nogil:
    if not a.waiting:
        return
    a.waiting = False
    if a.wait_prev != NULL:
        a.wait_prev.wait_next = a.wait_next
    else:
        w.wait_head = a.wait_next
    if a.wait_next != NULL:
        a.wait_next.wait_prev = a.wait_prev
    else:
        w.wait_tail = a.wait_prev
    a.wait_prev = NULL
    a.wait_next = NULL


cdef void confirm(Worker* w, Assoc* a, bint over_tcp, bint server_mode) noexcept nogil:
    """The first datagram fixed the mapping: Association Confirmation on TCP (UDP-04)."""
    cdef unsigned char msg[S6_ASSOC_HEADER]
    cdef Event* ev
    wait_remove(w, a)
    ev = new_event(w, EV_CONFIRMED, a.aid)
    if ev != NULL:
        ev.over_tcp = over_tcp
        ev.server_mode = server_mode
        ev.channel_id = a.chan.id if a.chan != NULL else -1
        if not over_tcp:
            ev.family = a.client_family
            memcpy(ev.addr, a.client_addr, 16)
            ev.port = a.client_port
    if a.socks5:
        return  # RFC 1928 has no confirmation message
    msg[0] = S6_VERSION
    msg[1] = S6_CONFIRMATION
    put_u16(msg + 2, S6_ASSOC_HEADER)
    memcpy(msg + 4, a.aid, 8)
    tcp_send_control(w, a, msg, S6_ASSOC_HEADER)


cdef void close_endpoint(Worker* w, Endpoint* ep) noexcept nogil:
    if ep.fd < 0:
        return
    # Explicit removal: close() alone keeps the registration while another descriptor
    # of the same socket lives (a dup in the control plane), and a later event would
    # carry a pointer to freed memory.
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, ep.fd, NULL)
    close(ep.fd)
    ep.fd = -1


cdef void end_assoc(Worker* w, Assoc* a, int reason, const char* cause) noexcept nogil:
    """Close every socket of the association now; report it at the end of the turn."""
    cdef int i
    cdef Event* ev
    cdef Channel* ch
    if a.reason != END_LIVE:
        return
    a.reason = reason
    if cause != NULL:
        i = 0
        while cause[i] != 0 and i < <int>sizeof(a.cause) - 1:
            a.cause[i] = cause[i]
            i += 1
        a.cause[i] = 0
    table_remove(w, a)
    wait_remove(w, a)
    if a.chan != NULL:
        # D28 "the reverse holds": the channel ends with the last association it carries (D32).
        ch = a.chan
        channel_unlink(ch, a)
        if ch.assocs == NULL:
            end_channel(w, ch, b"association ended", True)
    close_endpoint(w, &a.tcp)
    close_endpoint(w, &a.s5)
    for i in range(a.nremote):
        close_endpoint(w, &a.remote[i])
    free(a.rx)
    a.rx = NULL
    free(a.tx)
    a.tx = NULL
    a.tx_len = 0
    a.tx_off = 0
    free(a.dests)
    a.dests = NULL
    a.dcap = 0
    free(a.names)
    a.names = NULL
    a.nnames = 0
    # D24: datagrams still waiting for a verdict or a name end with the association.
    free_held(take_held(w, a))
    ev = new_event(w, EV_ENDED, a.aid)
    if ev == NULL:
        # Out of memory: the struct is leaked rather than freed under a live pointer.
        return
    ev.assoc = a
    w.nended += 1


# ---------------------------------------------------------------------------
# Client -> remote

cdef inline bint same_group(Worker* w, int k, int j) noexcept nogil:
    """Messages k and j go from one association to one address, with the same control data."""
    cdef msghdr* a = &w.tx[k].msg_hdr
    cdef msghdr* b = &w.tx[j].msg_hdr
    if w.txowner[k] != w.txowner[j] or a.msg_namelen != b.msg_namelen:
        return False
    if a.msg_controllen != b.msg_controllen:
        return False
    if a.msg_name != b.msg_name and memcmp(a.msg_name, b.msg_name, a.msg_namelen) != 0:
        return False
    return a.msg_controllen == 0 or memcmp(a.msg_control, b.msg_control, a.msg_controllen) == 0


cdef int build_groups(Worker* w, int start, int end) noexcept nogil:
    """Group tx[start:end) (one socket) into gtx; the number of groups.

    With GSO a run of datagrams from one association to one address, all of one size
    (the last may be shorter), becomes one message of several iovecs and a UDP_SEGMENT
    control message: the kernel builds and routes one packet and segments it (or the
    receiving socket does, on loopback), instead of once per datagram. The datagrams on
    the wire are the same.
    """
    cdef int ng = 0
    cdef int gi = 0
    cdef int k = start
    cdef int n
    cdef int j
    cdef size_t seg
    cdef size_t size
    cdef size_t total
    cdef msghdr* g
    cdef cmsghdr* c
    cdef unsigned char* ctl
    while k < end:
        n = 1
        seg = w.tx[k].msg_hdr.msg_iov[0].iov_len
        if w.gso and not w.txowner[k].no_gso and seg > 0:
            total = seg
            while k + n < end and n < GSO_MAX_SEGS and same_group(w, k, k + n):
                size = w.tx[k + n].msg_hdr.msg_iov[0].iov_len
                if size == 0 or size > seg or total + size > GSO_MAX_BYTES:
                    break
                total += size
                n += 1
                if size < seg:
                    break
        w.gfirst[ng] = k
        w.gcount[ng] = n
        g = &w.gtx[ng].msg_hdr
        memcpy(g, &w.tx[k].msg_hdr, sizeof(msghdr))
        if n > 1:
            for j in range(n):
                w.giov[gi + j] = w.tx[k + j].msg_hdr.msg_iov[0]
            g.msg_iov = &w.giov[gi]
            g.msg_iovlen = <size_t>n
            gi += n
            ctl = w.gctl + ng * GCTL_SIZE
            memset(ctl, 0, GCTL_SIZE)
            if g.msg_controllen:
                memcpy(ctl, g.msg_control, g.msg_controllen)
            # Cast: the UDP_SEGMENT control message goes right after the copied ones.
            c = <cmsghdr*>(ctl + g.msg_controllen)
            c.cmsg_level = SOL_UDP
            c.cmsg_type = UDP_SEGMENT
            c.cmsg_len = CMSG_LEN(2)
            # The segment size, a native-order 16-bit integer.
            (<unsigned short*>CMSG_DATA(c))[0] = <unsigned short>seg
            g.msg_control = ctl
            g.msg_controllen = g.msg_controllen + CMSG_SPACE(2)
        ng += 1
        k += n
    return ng


cdef void send_run(Worker* w, int start, int end, bint to_remote) noexcept nogil:
    """Send tx[start:end), all for one socket, counting every datagram sent or dropped."""
    cdef int ng = build_groups(w, start, end)
    cdef int g = 0
    cdef int r
    cdef int k
    cdef int q
    cdef int err
    cdef bint retried = False
    cdef Assoc* owner
    while g < ng:
        r = sendmmsg(w.txfd[start], &w.gtx[g], <unsigned int>(ng - g), MSG_DONTWAIT)
        if r > 0:
            for q in range(g, g + r):
                for k in range(w.gfirst[q], w.gfirst[q] + w.gcount[q]):
                    if to_remote:
                        w.txowner[k].c2r_dgrams += 1
                        w.txowner[k].c2r_bytes += w.txpay[k]
                    else:
                        w.txowner[k].r2c_dgrams += 1
                        w.txowner[k].r2c_bytes += w.txpay[k]
            g += r
            retried = False
            continue
        err = errno
        if r < 0 and err == EINTR:
            continue
        if r < 0 and not retried and (err == ECONNREFUSED or err == EHOSTUNREACH or err == ENETUNREACH
                                      or err == EHOSTDOWN or err == ENETDOWN):
            # With IP_RECVERR an ICMP error is also kept as the socket's pending error,
            # which the next send returns once (and then forgets): try this one again.
            retried = True
            continue
        if r < 0 and err == EAGAIN:
            # Send buffer full: the rest of this run is lost (UDP), counted.
            for k in range(w.gfirst[g], end):
                count_drop(w, w.txowner[k], D_SEND_FAILED)
            return
        if w.gcount[g] > 1:
            # The kernel refused the GSO send (EIO: no checksum offload on the way out,
            # EINVAL: a segment larger than the path MTU, ...): from here on this
            # association's datagrams go one by one and each gets its own verdict.
            owner = w.txowner[w.gfirst[g]]
            owner.no_gso = True
            if err == EIO:  # the device cannot do it at all
                w.gso = False
            send_run(w, w.gfirst[g], end, to_remote)
            return
        # This datagram is refused (EMSGSIZE, EACCES, ...): skip it, send the rest.
        count_drop(w, w.txowner[w.gfirst[g]], D_SEND_FAILED)
        g += 1
        retried = False


cdef void flush_remote(Worker* w) noexcept nogil:
    """Send the queued client datagrams; runs for the same remote socket go in one sendmmsg."""
    cdef int start = 0
    cdef int end
    while start < w.ntx:
        end = start + 1
        while end < w.ntx and w.txfd[end] == w.txfd[start]:
            end += 1
        send_run(w, start, end, True)
        start = end
    w.ntx = 0


cdef Endpoint* remote_for(Assoc* a, unsigned char family) noexcept nogil:
    cdef int i
    if family == 4:
        for i in range(a.nremote):
            if a.remote[i].fd >= 0 and a.remote[i].family == AF_INET:
                return &a.remote[i]
    for i in range(a.nremote):
        if a.remote[i].fd >= 0 and a.remote[i].family == AF_INET6 and (family == 6 or not a.remote[i].v6only):
            return &a.remote[i]
    return NULL


# Datagrams waiting for a verdict or a name (D24)

cdef inline const unsigned char* held_address(Held* h) noexcept nogil:
    return <const unsigned char*>(h + 1)


cdef inline const unsigned char* held_payload(Held* h) noexcept nogil:
    return <const unsigned char*>(h + 1) + h.address_length


cdef bint hold(Worker* w, Assoc* a, Held* reuse, const unsigned char* payload, size_t plen,
               unsigned int atyp, const unsigned char* address, Py_ssize_t address_length,
               unsigned int port) noexcept nogil:
    """Keep a datagram until its destination is decided (D24). True: held; False: dropped.

    The bound is per association (``hold_datagrams``, ``hold_bytes`` of payload); past
    it the datagram is dropped and counted as PENDING. The payload is copied (it lies in
    a receive buffer the next recvmmsg reuses), unless ``reuse`` is a released entry.
    """
    cdef Engine* e = w.engine
    cdef Held* h = reuse
    if a.held_count >= e.hold_datagrams or a.held_bytes + plen > e.hold_bytes:
        count_drop(w, a, D_PENDING)
        return False
    if h == NULL:
        h = <Held*>malloc(sizeof(Held) + <size_t>address_length + plen)
        if h == NULL:
            count_drop(w, a, D_PENDING)
            return False
        h.plen = plen
        h.atyp = atyp
        h.port = port
        h.address_length = address_length
        memcpy(<unsigned char*>(h + 1), address, <size_t>address_length)
        if plen:
            memcpy(<unsigned char*>(h + 1) + address_length, payload, plen)
    h.next = NULL
    if a.held_tail != NULL:
        a.held_tail.next = h
    else:
        a.held_head = h
    a.held_tail = h
    a.held_count += 1
    a.held_bytes += plen
    w.held_count += 1
    w.held_bytes += <int64_t>plen
    return True


cdef Held* take_held(Worker* w, Assoc* a) noexcept nogil:
    """Detach the association's held datagrams (a list in arrival order)."""
    cdef Held* h = a.held_head
    w.held_count -= a.held_count
    w.held_bytes -= <int64_t>a.held_bytes
    a.held_head = NULL
    a.held_tail = NULL
    a.held_count = 0
    a.held_bytes = 0
    return h


cdef void free_held(Held* h) noexcept nogil:
    cdef Held* nxt
    while h != NULL:
        nxt = h.next
        free(h)
        h = nxt


cdef void release_held(Worker* w, Assoc* a) noexcept nogil:
    """A verdict or a name arrived: run the held datagrams through queue_remote again.

    In arrival order: those whose destination is now allowed are queued and sent,
    denied or unresolvable ones are dropped (DENIED), and those still waiting (another
    destination, or a name now resolved whose address needs a verdict) are held again
    in the same order. The sent ones' iovecs point into their entries, so the entries
    are freed only after the flush.
    """
    cdef Held* h = take_held(w, a)
    cdef Held* nxt
    cdef Held* done = NULL
    if h == NULL:
        return
    while h != NULL:
        nxt = h.next
        if not queue_remote(w, a, held_payload(h), h.plen, h.atyp, held_address(h), h.address_length,
                            h.port, h):
            h.next = done
            done = h
        h = nxt
    flush_remote(w)
    free_held(done)


cdef bint queue_remote(Worker* w, Assoc* a, const unsigned char* payload, size_t plen,
                       unsigned int atyp, const unsigned char* address, Py_ssize_t address_length,
                       unsigned int port, Held* reuse) noexcept nogil:
    """Check the destination and queue the payload for it, hold it, or count why not.

    True when the datagram was held (D24): its destination waits for a verdict or a
    name; ``reuse``, a datagram held before and released by :func:`release_held`, is
    then queued again as it is instead of being copied anew.
    """
    cdef unsigned char family
    cdef unsigned char addr[16]
    cdef Name* nm
    cdef Dest* d
    cdef Endpoint* rep
    cdef Event* ev
    cdef Slot* s
    cdef int k
    memset(addr, 0, 16)
    if atyp == ATYP_IPV4:
        family = 4
        memcpy(addr, address, 4)
    elif atyp == ATYP_IPV6:
        if is_v4_mapped(address):
            family = 4
            memcpy(addr, address + 12, 4)
        else:
            family = 6
            memcpy(addr, address, 16)
    else:
        # D20: a name is resolved by the control plane once, then cached here.
        nm = name_find(a, address, address_length)
        if nm == NULL:
            nm = name_add(a, address, address_length)
            if nm == NULL:
                count_drop(w, a, D_TABLE_FULL)
                return False
            ev = new_event(w, EV_RESOLVE, a.aid)
            if ev != NULL:
                ev.name_len = <unsigned char>address_length
                memcpy(ev.name, address, <size_t>address_length)
                ev.port = port
            return hold(w, a, reuse, payload, plen, atyp, address, address_length, port)
        if nm.state == N_PENDING:
            return hold(w, a, reuse, payload, plen, atyp, address, address_length, port)
        if nm.state == N_FAILED:
            count_drop(w, a, D_DENIED)
            return False
        family = nm.family
        memcpy(addr, nm.addr, 16)
    if port == 0 or all_zero(addr, 4 if family == 4 else 16):
        # Nothing can be sent to port 0 or the unspecified address (the all-zero one with
        # an empty payload was handled as server mode before, UDP-06).
        count_drop(w, a, D_DENIED)
        return False
    d = dest_find(a, family, addr, port)
    if d == NULL:
        d = dest_add(a, family, addr, port, V_PENDING if a.ask else V_ALLOW)
        if d == NULL:
            count_drop(w, a, D_TABLE_FULL)
            return False
        if a.ask:
            ev = new_event(w, EV_ASK, a.aid)
            if ev != NULL:
                ev.family = family
                memcpy(ev.addr, addr, 16)
                ev.port = port
    if d.verdict == V_PENDING:
        return hold(w, a, reuse, payload, plen, atyp, address, address_length, port)
    if d.verdict == V_DENY:
        count_drop(w, a, D_DENIED)
        return False
    rep = remote_for(a, family)
    if rep == NULL:
        count_drop(w, a, D_NO_SOCKET)
        return False
    if plen > <size_t>w.engine.max_datagram:
        count_drop(w, a, D_TOO_BIG)
        return False
    d.contacted = 1
    if w.ntx >= w.engine.batch:
        flush_remote(w)
    k = w.ntx
    s = &w.slots[k]
    memset(&w.tx[k], 0, sizeof(mmsghdr))
    w.tx[k].msg_hdr.msg_namelen = make_sa(&s.dst, rep.family, family, addr, port)
    w.tx[k].msg_hdr.msg_name = &s.dst
    # Cast: the iovec points at the payload inside the receive buffer (no copy).
    s.iov.iov_base = <void*>payload
    s.iov.iov_len = plen
    w.tx[k].msg_hdr.msg_iov = &s.iov
    w.tx[k].msg_hdr.msg_iovlen = 1
    w.txfd[k] = rep.fd
    w.txowner[k] = a
    w.txpay[k] = <unsigned int>plen
    w.ntx += 1
    return False


cdef inline int parse_drop_reason(Py_ssize_t result) noexcept nogil:
    if result == DGRAM_E_TRUNCATED:
        return D_TRUNCATED
    if result == DGRAM_E_ADDRESS_TYPE:
        return D_ADDRESS_TYPE
    return D_MALFORMED


cdef bint read_local(msghdr* m, unsigned char* family, unsigned char* addr, int* ifindex) noexcept nogil:
    """The destination address of a received datagram (IP_PKTINFO / IPV6_PKTINFO)."""
    cdef cmsghdr* c
    cdef in_pktinfo* pi
    cdef in6_pktinfo* pi6
    if m.msg_control == NULL:
        return False
    c = CMSG_FIRSTHDR(m)
    while c != NULL:
        if c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_PKTINFO:
            # Cast: the kernel put an in_pktinfo in this control message.
            pi = <in_pktinfo*>CMSG_DATA(c)
            family[0] = 4
            memset(addr, 0, 16)
            memcpy(addr, &pi.ipi_addr, 4)
            ifindex[0] = pi.ipi_ifindex
            return True
        if c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_PKTINFO:
            # Cast: an in6_pktinfo.
            pi6 = <in6_pktinfo*>CMSG_DATA(c)
            memset(addr, 0, 16)
            if is_v4_mapped(pi6.ipi6_addr.s6_addr):
                family[0] = 4
                memcpy(addr, pi6.ipi6_addr.s6_addr + 12, 4)
            else:
                family[0] = 6
                memcpy(addr, pi6.ipi6_addr.s6_addr, 16)
            ifindex[0] = <int>pi6.ipi6_ifindex
            return True
        c = CMSG_NXTHDR(m, c)
    return False


cdef int check_client(Worker* w, Assoc* a, Endpoint* ep, Slot* s, msghdr* m) noexcept nogil:
    """UDP-03 / D19: fix the mapping on the first datagram, else match it. A drop reason or -1."""
    cdef unsigned char family
    cdef unsigned char addr[16]
    cdef unsigned int port
    cdef unsigned char lfamily = 0
    cdef unsigned char laddr[16]
    cdef int ifindex = 0
    cdef bint has_local
    if not sa_key(&s.peer, &family, addr, &port):
        return D_SOURCE
    has_local = ep.wildcard and read_local(m, &lfamily, laddr, &ifindex)
    if a.state == ST_UNMAPPED:
        if a.want_family != 0 and (family != a.want_family or memcmp(addr, a.want_addr, 16) != 0):
            return D_SOURCE
        if a.want_port != 0 and port != a.want_port:
            return D_SOURCE
        a.state = ST_UDP
        a.map_ep = ep
        memcpy(&a.client, &s.peer, sizeof(sockaddr_storage))
        a.client_len = m.msg_namelen
        a.client_family = family
        memcpy(a.client_addr, addr, 16)
        a.client_port = port
        a.has_local = has_local
        if has_local:
            a.local_family = lfamily
            memcpy(a.local_addr, laddr, 16)
            a.local_ifindex = ifindex
        return -1
    if a.state != ST_UDP or a.map_ep != ep:
        return D_MAPPING
    if family != a.client_family or port != a.client_port or memcmp(addr, a.client_addr, 16) != 0:
        return D_MAPPING
    if a.has_local and (lfamily != a.local_family or memcmp(laddr, a.local_addr, 16) != 0):
        return D_MAPPING
    return -1


cdef inline bint is_server_probe(DatagramHeaderView* hv, size_t plen) noexcept nogil:
    # UDP-06: an empty datagram to the all-zero address and port.
    return (plen == 0 and hv.port == 0 and hv.address_type != ATYP_DOMAIN
            and all_zero(hv.address, <int>hv.address_length))


cdef void socks6_datagram(Worker* w, Endpoint* ep, int i) noexcept nogil:
    """One datagram from a SOCKS 6 port: parse in place, match, queue its payload."""
    cdef Slot* s = &w.slots[i]
    cdef msghdr* m = &w.rx[i].msg_hdr
    cdef size_t length = w.rx[i].msg_len
    cdef const unsigned char* p = s.buf + HEADROOM
    cdef DatagramHeaderView hv
    cdef Py_ssize_t r
    cdef Assoc* a
    cdef size_t plen
    cdef int reason
    cdef bint first
    cdef bint probe
    if m.msg_flags & MSG_TRUNC:
        count_drop(w, NULL, D_TOO_BIG)
        return
    r = parse_datagram_header(p, <Py_ssize_t>length, &hv)
    if r < 0:
        count_drop(w, NULL, parse_drop_reason(r))
        return
    if hv.message_length > length:
        # UDP-05: "If the Message Length is larger than the size of the UDP payload, the
        # message MUST be silently ignored."
        count_drop(w, NULL, D_LENGTH)
        return
    a = table_find(w, id_key(hv.association_id))
    if a == NULL or a.socks5:
        count_drop(w, NULL, D_UNKNOWN_ASSOCIATION)
        return
    # UDP-05: bytes after Message Length are padding, ignored.
    plen = hv.message_length - <size_t>r
    first = a.state == ST_UNMAPPED
    reason = check_client(w, a, ep, s, m)
    if reason >= 0:
        count_drop(w, a, reason)
        return
    probe = is_server_probe(&hv, plen)
    if probe:
        a.server_mode = True
    if first:
        confirm(w, a, False, probe)
        if a.reason != END_LIVE:
            return
    if probe:
        return
    queue_remote(w, a, p + r, plen, hv.address_type, hv.address, hv.address_length, hv.port, NULL)


cdef void socks5_datagram(Worker* w, Endpoint* ep, int i) noexcept nogil:
    """One datagram on a SOCKS 5 association's socket (RFC 1928 section 7, D19)."""
    cdef Slot* s = &w.slots[i]
    cdef msghdr* m = &w.rx[i].msg_hdr
    cdef size_t length = w.rx[i].msg_len
    cdef const unsigned char* p = s.buf + HEADROOM
    cdef Assoc* a = ep.assoc
    cdef size_t header
    cdef unsigned int atyp
    cdef int reason
    cdef bint first
    cdef Py_ssize_t alen
    if a.reason != END_LIVE:
        return
    if m.msg_flags & MSG_TRUNC:
        count_drop(w, a, D_TOO_BIG)
        return
    # RSV(2) FRAG ATYP DST.ADDR DST.PORT.
    if length < 4:
        count_drop(w, a, D_TRUNCATED)
        return
    atyp = p[3]
    if atyp == ATYP_IPV4:
        header = 4 + 4 + 2
        alen = 4
    elif atyp == ATYP_IPV6:
        header = 4 + 16 + 2
        alen = 16
    elif atyp == ATYP_DOMAIN:
        if length < 5:
            count_drop(w, a, D_TRUNCATED)
            return
        alen = p[4]
        header = 4 + 1 + <size_t>alen + 2
    else:
        count_drop(w, a, D_ADDRESS_TYPE)
        return
    if length < header:
        count_drop(w, a, D_TRUNCATED)
        return
    if atyp == ATYP_DOMAIN and (alen == 0 or memchr_zero(p + 5, alen)):
        count_drop(w, a, D_MALFORMED)
        return
    # FRAG other than 0: no reassembly (RFC 1928 section 7 allows it; D19).
    if p[2] != 0:
        count_drop(w, a, D_FRAGMENT)
        return
    first = a.state == ST_UNMAPPED
    reason = check_client(w, a, ep, s, m)
    if reason >= 0:
        count_drop(w, a, reason)
        return
    if first:
        confirm(w, a, False, False)
    queue_remote(w, a, p + header, length - header, atyp,
                 p + (5 if atyp == ATYP_DOMAIN else 4), alen, get_u16(p + header - 2), NULL)


cdef inline bint memchr_zero(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] == 0:
            return True
    return False


cdef void setup_rx(Worker* w, int base, int n, bint with_control) noexcept nogil:
    cdef int i
    cdef Slot* s
    cdef msghdr* m
    for i in range(base, base + n):
        s = &w.slots[i]
        m = &w.rx[i].msg_hdr
        m.msg_name = &s.peer
        m.msg_namelen = sizeof(sockaddr_storage)
        s.iov.iov_base = s.buf + HEADROOM
        s.iov.iov_len = <size_t>w.engine.max_datagram
        m.msg_iov = &s.iov
        m.msg_iovlen = 1
        if with_control:
            m.msg_control = s.ctl
            m.msg_controllen = CTL_SIZE
        else:
            m.msg_control = NULL
            m.msg_controllen = 0
        m.msg_flags = 0


cdef void client_readable(Worker* w, Endpoint* ep) noexcept nogil:
    """A SOCKS 6 port or a SOCKS 5 association socket: datagrams from clients."""
    cdef int rounds
    cdef int n
    cdef int i
    for rounds in range(PORT_ROUNDS):
        if ep.kind == EP_S5 and ep.assoc.reason != END_LIVE:
            return
        setup_rx(w, 0, w.engine.batch, ep.wildcard)
        n = recvmmsg(ep.fd, w.rx, <unsigned int>w.engine.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            # EAGAIN: drained. EINTR: epoll reports the socket again. Anything else on a
            # UDP socket (a stale pending error) is consumed by this call.
            return
        w.ntx = 0
        for i in range(n):
            if ep.kind == EP_PORT:
                socks6_datagram(w, ep, i)
            else:
                socks5_datagram(w, ep, i)
        flush_remote(w)
        if n < w.engine.batch:
            return


# ---------------------------------------------------------------------------
# Channels (add_channel, issue 11): a socket connected to one client, maybe DTLS
#
# Thread-safety: a channel is housed by one worker at a time, and only that worker reads
# its socket or calls OpenSSL on its SSL*. It starts in the worker of (id % workers); the
# first message naming an association of another worker, while nothing is mapped to the
# channel, hands the channel over to that worker (the message goes with it), so once
# mapped, the channel, its SSL* and its associations are all touched by one thread, and
# the associations' datagrams to the client are encrypted there (no lock per datagram).
# A channel carries every association of its worker whose first datagram arrives on it
# (UDP-03: the mapping is per Association ID); the first message of an association of
# another worker on a mapped channel is dropped (MAPPING): D32, the control plane draws
# the IDs of one client address so that they share a worker. The channel ends with the
# last association mapped to it.
# OpenSSL's error queue is per thread: cleared after each call that failed.

cdef OpenSSLApi SSLAPI
cdef bint SSLAPI_READY = False
cdef unsigned char NO_ID[8]  # the aid of an event that names no association (zeros)


cdef void channel_list_remove(Worker* w, Channel* ch) noexcept nogil:
    if ch.listed:
        ch.listed = False
        if ch.wprev != NULL:
            ch.wprev.wnext = ch.wnext
        else:
            w.chans = ch.wnext
        if ch.wnext != NULL:
            ch.wnext.wprev = ch.wprev
        ch.wprev = NULL
        ch.wnext = NULL
    if ch.waiting:
        ch.waiting = False
        if ch.cwprev != NULL:
            ch.cwprev.cwnext = ch.cwnext
        else:
            w.cwait_head = ch.cwnext
        if ch.cwnext != NULL:
            ch.cwnext.cwprev = ch.cwprev
        else:
            w.cwait_tail = ch.cwprev
        ch.cwprev = NULL
        ch.cwnext = NULL


cdef void channel_wait_insert(Worker* w, Channel* ch) noexcept nogil:
    """Into the unmapped channels, ordered by deadline (from the tail: mostly O(1))."""
    cdef Channel* at = w.cwait_tail
    while at != NULL and at.deadline_ms > ch.deadline_ms:
        at = at.cwprev
    ch.waiting = True
    ch.cwprev = at
    if at != NULL:
        ch.cwnext = at.cwnext
        at.cwnext = ch
    else:
        ch.cwnext = w.cwait_head
        w.cwait_head = ch
    if ch.cwnext != NULL:
        ch.cwnext.cwprev = ch
    else:
        w.cwait_tail = ch


cdef void channel_link(Channel* ch, Assoc* a) noexcept nogil:
    """Map ``a`` to ``ch`` (same worker)."""
    a.chan = ch
    a.chan_prev = NULL
    a.chan_next = ch.assocs
    if ch.assocs != NULL:
        ch.assocs.chan_prev = a
    ch.assocs = a
    ch.nassocs += 1


cdef void channel_unlink(Channel* ch, Assoc* a) noexcept nogil:
    """``a`` no longer uses ``ch`` (it ended, or the channel did: D28)."""
    if a.chan_prev != NULL:
        a.chan_prev.chan_next = a.chan_next
    else:
        ch.assocs = a.chan_next
    if a.chan_next != NULL:
        a.chan_next.chan_prev = a.chan_prev
    a.chan_prev = NULL
    a.chan_next = NULL
    a.chan = NULL
    ch.nassocs -= 1


cdef inline Assoc* channel_sole(Channel* ch) noexcept nogil:
    """The association a channel's record drops are counted against: its only one, else none."""
    return ch.assocs if ch.nassocs == 1 else NULL


cdef void channel_send_raw(Channel* ch, const unsigned char* data, size_t n) noexcept nogil:
    send(ch.ep.fd, data, n, MSG_DONTWAIT | MSG_NOSIGNAL)


cdef void flush_records(Worker* w, Channel* ch) noexcept nogil:
    """Send what OpenSSL wrote to the outgoing BIO (a flight, an alert, a close_notify),
    cut into datagrams at record boundaries, each at most the MTU where records allow."""
    cdef int n
    cdef int start
    cdef int at
    cdef int end
    cdef const unsigned char* b = w.dtlsout
    while True:
        n = SSLAPI.BIO_read(ch.wbio, w.dtlsout, DTLS_BUF)
        if n <= 0:
            SSLAPI.ERR_clear_error()
            return
        start = 0
        at = 0
        while at + DTLS_HEADER <= n:
            end = at + DTLS_HEADER + <int>get_u16(b + at + 11)
            if end - start > ch.mtu and at > start:
                channel_send_raw(ch, b + start, <size_t>(at - start))
                start = at
            at = end
        if start < n:
            channel_send_raw(ch, b + start, <size_t>(n - start))


cdef void end_channel(Worker* w, Channel* ch, const char* cause, bint notify) noexcept nogil:
    """Close the channel now (a close_notify first when ``notify``); report it at the end of
    the turn. Its associations, if any, live on without it (D28)."""
    cdef Event* ev
    if ch.ended:
        return
    ch.ended = True
    strcpy_cause(ch.cause, cause)
    channel_list_remove(w, ch)
    if notify and ch.ssl != NULL and ch.ep.fd >= 0:
        if SSLAPI.SSL_shutdown(ch.ssl) < 0:
            SSLAPI.ERR_clear_error()
        flush_records(w, ch)
    close_endpoint(w, &ch.ep)
    while ch.assocs != NULL:
        channel_unlink(ch, ch.assocs)
    free(ch.pending)
    ch.pending = NULL
    ev = new_event(w, EV_CHANNEL_ENDED, NO_ID)
    if ev != NULL:
        ev.channel = ch
    # else: out of memory; the struct is leaked rather than freed under a live pointer.


cdef bint channel_to_client(Worker* w, Assoc* a, const unsigned char* msg, size_t n) noexcept nogil:
    """One message to the client of an association mapped to a channel (encrypted on a
    DTLS channel). False, counted, when it could not go."""
    cdef Channel* ch = a.chan
    cdef int r
    cdef int out
    if ch == NULL:
        count_drop(w, a, D_NO_CHANNEL)  # D28: the channel ended before the association
        return False
    if n > <size_t>ch.limit:
        ch.drops += 1
        count_drop(w, a, D_TOO_BIG)  # more than one record carries within the MTU
        return False
    if ch.ssl == NULL:
        if send(ch.ep.fd, msg, n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0:
            ch.drops += 1
            count_drop(w, a, D_SEND_FAILED)
            return False
        ch.datagrams_out += 1
        return True
    r = SSLAPI.SSL_write(ch.ssl, msg, <int>n)
    if r <= 0:
        SSLAPI.ERR_clear_error()
        ch.drops += 1
        count_drop(w, a, D_SEND_FAILED)
        flush_records(w, ch)
        end_channel(w, ch, b"DTLS write failed", False)
        return False
    out = SSLAPI.BIO_read(ch.wbio, w.dtlsout, DTLS_BUF)
    if out <= 0:
        SSLAPI.ERR_clear_error()
        ch.drops += 1
        count_drop(w, a, D_SEND_FAILED)
        return False
    if send(ch.ep.fd, w.dtlsout, <size_t>out, MSG_DONTWAIT | MSG_NOSIGNAL) < 0:
        ch.drops += 1
        count_drop(w, a, D_SEND_FAILED)
        return False
    ch.datagrams_out += 1
    return True


cdef int records_check(const unsigned char* p, size_t n, int* application) noexcept nogil:
    """Whole, well-formed DTLS record headers only (as net.dtls.split_records): the number
    of records, or -1 (garbage, a record cut short). ``application``: how many hold
    application data."""
    cdef size_t at = 0
    cdef size_t length
    cdef int count = 0
    application[0] = 0
    while at < n:
        if n - at < DTLS_HEADER:
            return -1
        if p[at] < CT_CHANGE_CIPHER_SPEC or p[at] > CT_MAX or p[at + 1] != 0xFE:
            return -1
        length = get_u16(p + at + 11)
        if length > DTLS_MAX_BODY or at + DTLS_HEADER + length > n:
            return -1
        if p[at] == CT_APPLICATION_DATA:
            application[0] += 1
        count += 1
        at += DTLS_HEADER + length
    return count if count else -1


cdef void migrate_channel(Worker* w, Channel* ch, const unsigned char* msg, size_t n, int target) noexcept nogil:
    """Hand an unmapped channel and its message over to the worker of the association the
    message names (see the section comment). The caller must not touch ``ch`` afterwards."""
    cdef Engine* e = w.engine
    cdef Worker* t = &e.workers[target]
    cdef bint removed
    ch.pending = <unsigned char*>malloc(n if n else 1)
    if ch.pending == NULL:
        ch.drops += 1
        count_drop(w, NULL, D_TABLE_FULL)
        return
    memcpy(ch.pending, msg, n)
    ch.pending_len = n
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, ch.ep.fd, NULL)
    channel_list_remove(w, ch)
    pthread_mutex_lock(&e.lock)
    removed = ch.remove_requested
    if not removed:
        ch.owner = target
    pthread_mutex_unlock(&e.lock)
    if removed:
        end_channel(w, ch, b"removed", True)
        return
    pthread_mutex_lock(&t.lock)
    if not t.stop:
        ch.next = t.chan_inbox
        t.chan_inbox = ch
        pthread_mutex_unlock(&t.lock)
        wake_fd(t.wakefd)
        return
    pthread_mutex_unlock(&t.lock)
    # The engine is closing: end it here (its fd is still open).
    pthread_mutex_lock(&e.lock)
    ch.owner = w.index
    pthread_mutex_unlock(&e.lock)
    end_channel(w, ch, b"removed", True)


cdef int channel_message(Worker* w, Channel* ch, const unsigned char* p, size_t length) noexcept nogil:
    """One SOCKS 6 message from a channel: the UDP port's rules (UDP-03, UDP-05) with the
    channel as the 5-tuple. 0, or 1 when the channel ended or moved to another worker."""
    cdef DatagramHeaderView hv
    cdef Py_ssize_t r
    cdef Assoc* a
    cdef size_t plen
    cdef bint probe
    cdef int owner
    r = parse_datagram_header(p, <Py_ssize_t>length, &hv)
    if r < 0:
        ch.drops += 1
        count_drop(w, NULL, parse_drop_reason(r))
        return 0
    if hv.message_length > length:
        ch.drops += 1
        count_drop(w, NULL, D_LENGTH)  # UDP-05
        return 0
    owner = hv.association_id[7] % w.engine.nworkers
    if owner != w.index:
        if ch.assocs == NULL:
            migrate_channel(w, ch, p, length, owner)
            return 1
        # D32: a mapped channel stays with its worker; another worker's association (not
        # looked up: its table is that worker's) cannot share it.
        ch.drops += 1
        count_drop(w, NULL, D_MAPPING)
        return 0
    a = table_find(w, id_key(hv.association_id))
    if a == NULL or a.socks5:
        ch.drops += 1
        count_drop(w, NULL, D_UNKNOWN_ASSOCIATION)
        return 0
    plen = hv.message_length - <size_t>r
    if a.state == ST_UNMAPPED:
        if a.want_family != 0 and (ch.peer_family != a.want_family
                                   or memcmp(ch.peer_addr, a.want_addr, 16) != 0):
            ch.drops += 1
            count_drop(w, a, D_SOURCE)
            return 0
        if a.want_port != 0 and ch.peer_port != a.want_port:
            ch.drops += 1
            count_drop(w, a, D_SOURCE)
            return 0
        a.state = ST_CHANNEL
        a.client_family = ch.peer_family
        memcpy(a.client_addr, ch.peer_addr, 16)
        a.client_port = ch.peer_port
        if ch.assocs == NULL:
            channel_list_remove(w, ch)  # off the unmapped list (and the worker's list) ...
            ch.listed = True            # ... back on the worker's list
            ch.wprev = NULL
            ch.wnext = w.chans
            if w.chans != NULL:
                w.chans.wprev = ch
            w.chans = ch
        channel_link(ch, a)  # UDP-03: one more ID mapped to this connection (D32)
        probe = is_server_probe(&hv, plen)
        if probe:
            a.server_mode = True
        confirm(w, a, False, probe)
        if a.reason != END_LIVE:
            return 1
        if probe:
            return 0
    elif a.chan != ch:
        ch.drops += 1
        count_drop(w, a, D_MAPPING)  # mapped to the UDP port, the TCP connection or another channel
        return 0
    elif is_server_probe(&hv, plen):
        a.server_mode = True
        return 0
    queue_remote(w, a, p + r, plen, hv.address_type, hv.address, hv.address_length, hv.port, NULL)
    return 0


cdef int channel_read_ssl(Worker* w, Channel* ch, unsigned char* buf, size_t cap,
                          int application, bint only_application) noexcept nogil:
    """Read every plaintext OpenSSL has for the channel into ``buf`` and handle each.
    ``application``: application records in the datagram just written (-1: unknown), to
    count the ones OpenSSL discarded (bad MAC, replay); ``only_application``: the datagram
    held nothing else, so once that many came out there is nothing more to read (this
    saves the SSL_read that would only say WANT_READ, per datagram). 0, or 1 when the
    channel ended or moved."""
    cdef int r
    cdef int err
    cdef int delivered = 0
    while True:
        if delivered:
            if only_application and delivered == application:
                return 0
            flush_remote(w)  # the queued payload points into buf, which the next read reuses
        r = SSLAPI.SSL_read(ch.ssl, buf, <int>cap)
        if r > 0:
            delivered += 1
            ch.datagrams_in += 1
            if channel_message(w, ch, buf, <size_t>r):
                return 1
            continue
        err = SSLAPI.SSL_get_error(ch.ssl, r)
        SSLAPI.ERR_clear_error()
        if err == SSL_ERROR_WANT_READ:
            break
        flush_records(w, ch)  # our alert, if OpenSSL wrote one
        # close_notify (ZERO_RETURN) or a fatal alert: both "closed by peer" (the contract).
        end_channel(w, ch, b"closed by peer", False)
        return 1
    while application > delivered:
        ch.drops += 1
        count_drop(w, channel_sole(ch), D_RECORD)
        application -= 1
    return 0


cdef inline bint is_client_hello(const unsigned char* p, size_t n) noexcept nogil:
    """An epoch-0 handshake record holding a ClientHello first (as net.dtls.is_client_hello)."""
    return (n > DTLS_HEADER + 12 and p[0] == CT_HANDSHAKE and p[1] == 0xFE and p[3] == 0
            and p[4] == 0 and p[DTLS_HEADER] == HS_CLIENT_HELLO)


cdef void report_hello(Worker* w, Channel* ch, const unsigned char* p, size_t n) noexcept nogil:
    """Pass a new handshake from the channel's 5-tuple to the control plane (RFC 6347
    section 4.2.8, D31): its cookie exchange answers it; the channel goes on meanwhile."""
    cdef Event* ev
    cdef Engine* e = w.engine
    cdef bint full
    cdef unsigned char* copy
    # Bounded: a flood (its source spoofed as the channel's client) must not grow memory
    # faster than the control plane drains; the listening socket's buffer bounds it there.
    pthread_mutex_lock(&e.lock)
    full = e.hellos >= MAX_HELLOS
    if not full:
        e.hellos += 1
    pthread_mutex_unlock(&e.lock)
    if full:
        ch.drops += 1
        count_drop(w, NULL, D_RECORD)
        return
    copy = <unsigned char*>malloc(n)
    if copy == NULL:
        pthread_mutex_lock(&e.lock)
        e.hellos -= 1
        pthread_mutex_unlock(&e.lock)
        ch.drops += 1
        count_drop(w, NULL, D_RECORD)
        return
    memcpy(copy, p, n)
    ev = new_event(w, EV_CHANNEL_HELLO, NO_ID)
    if ev == NULL:
        free(copy)
        pthread_mutex_lock(&e.lock)
        e.hellos -= 1
        pthread_mutex_unlock(&e.lock)
        return
    ev.channel_id = ch.id
    ev.data = copy
    ev.data_len = n


cdef int channel_datagram(Worker* w, Channel* ch, int i) noexcept nogil:
    """One datagram read from a channel. 0, or 1 when the channel ended or moved."""
    cdef msghdr* m = &w.rx[i].msg_hdr
    cdef size_t length = w.rx[i].msg_len
    cdef unsigned char* p = w.slots[i].buf + HEADROOM
    cdef int application
    cdef int count
    cdef int st
    if ch.ssl == NULL:
        if m.msg_flags & MSG_TRUNC:
            ch.drops += 1
            count_drop(w, NULL, D_TOO_BIG)
            return 0
        ch.datagrams_in += 1
        return channel_message(w, ch, p, length)
    count = -1 if m.msg_flags & MSG_TRUNC else records_check(p, length, &application)
    if count < 0:
        # Only whole records go to OpenSSL: a memory BIO is a byte stream, and the bytes of
        # a cut record would be joined to the next datagram's.
        ch.drops += 1
        count_drop(w, channel_sole(ch), D_RECORD)
        return 0
    if length <= MAX_HELLO and is_client_hello(p, length):
        # Not for the established connection (OpenSSL would discard a record of epoch 0).
        report_hello(w, ch, p, length)
        return 0
    if SSLAPI.BIO_write(ch.rbio, p, <int>length) != <int>length:
        SSLAPI.ERR_clear_error()
        ch.drops += 1
        count_drop(w, channel_sole(ch), D_RECORD)
        return 0
    # The plaintext goes where the ciphertext was (already copied into the BIO; never longer).
    st = channel_read_ssl(w, ch, p, length, application, count == application)
    if st == 0 and count != application:
        # A retransmitted final flight of the client (its Finished) makes OpenSSL write ours
        # again (RFC 6347 section 4.2.4): send what the read wrote.
        flush_records(w, ch)
    return st


cdef void channel_readable(Worker* w, Channel* ch) noexcept nogil:
    cdef int rounds
    cdef int n
    cdef int i
    cdef int want
    for rounds in range(PORT_ROUNDS):
        # One datagram at a time while unmapped: a message may hand the channel over to
        # another worker, and the rest of a batch would have to go with it.
        want = w.engine.batch if ch.assocs != NULL else 1
        setup_rx(w, 0, want, False)
        n = recvmmsg(ch.ep.fd, w.rx, <unsigned int>want, MSG_DONTWAIT, NULL)
        if n <= 0:
            return
        w.ntx = 0
        for i in range(n):
            if channel_datagram(w, ch, i):
                flush_remote(w)
                return  # ended or handed over: not ours to touch any more
        flush_remote(w)
        if n < want:
            return


cdef void adopt_channel(Worker* w, Channel* ch) noexcept nogil:
    """A channel added by Python, or handed over by another worker with its message."""
    cdef Engine* e = w.engine
    cdef bint removed
    ch.ep.channel = ch
    ch.listed = True
    ch.wprev = NULL
    ch.wnext = w.chans
    if w.chans != NULL:
        w.chans.wprev = ch
    w.chans = ch
    pthread_mutex_lock(&e.lock)
    removed = ch.remove_requested
    pthread_mutex_unlock(&e.lock)
    if removed:
        end_channel(w, ch, b"removed", True)
        return
    if not register_fd(w, &ch.ep, EPOLLIN):
        end_channel(w, ch, b"epoll_ctl failed", False)
        return
    if ch.assocs == NULL and e.first_ms > 0:
        if ch.deadline_ms == 0:
            ch.deadline_ms = w.now_ms + e.first_ms
        channel_wait_insert(w, ch)
    if ch.pending != NULL:
        w.ntx = 0
        if channel_message(w, ch, ch.pending, ch.pending_len) == 0 and ch.ssl != NULL:
            # More records of the same datagram may wait inside OpenSSL.
            flush_remote(w)
            channel_read_ssl(w, ch, w.dtlsin, DTLS_BUF, -1, False)
        flush_remote(w)
        if ch.pending != NULL:
            free(ch.pending)
            ch.pending = NULL


cdef void expire_channels(Worker* w) noexcept nogil:
    while w.cwait_head != NULL and w.cwait_head.deadline_ms <= w.now_ms:
        end_channel(w, w.cwait_head, b"unmapped", True)


cdef void end_all_channels(Worker* w) noexcept nogil:
    while w.chans != NULL:
        end_channel(w, w.chans, b"removed", True)


# ---------------------------------------------------------------------------
# Remote -> client

cdef void put_pktinfo(Assoc* a, msghdr* m, unsigned char* ctl) noexcept nogil:
    """Name the mapped local address as the source (ports bound to a wildcard address)."""
    cdef cmsghdr* c
    cdef in_pktinfo* pi
    cdef in6_pktinfo* pi6
    if not a.has_local:
        m.msg_control = NULL
        m.msg_controllen = 0
        return
    memset(ctl, 0, CTL_SIZE)
    m.msg_control = ctl
    m.msg_controllen = CTL_SIZE
    c = CMSG_FIRSTHDR(m)
    if a.map_ep.family == AF_INET:
        c.cmsg_level = IPPROTO_IP
        c.cmsg_type = IP_PKTINFO
        c.cmsg_len = CMSG_LEN(sizeof(in_pktinfo))
        # Cast: filling the control message's in_pktinfo.
        pi = <in_pktinfo*>CMSG_DATA(c)
        memcpy(&pi.ipi_spec_dst, a.local_addr, 4)
        m.msg_controllen = CMSG_SPACE(sizeof(in_pktinfo))
    else:
        c.cmsg_level = IPPROTO_IPV6
        c.cmsg_type = IPV6_PKTINFO
        c.cmsg_len = CMSG_LEN(sizeof(in6_pktinfo))
        # Cast: filling the control message's in6_pktinfo.
        pi6 = <in6_pktinfo*>CMSG_DATA(c)
        if a.local_family == 4:
            pi6.ipi6_addr.s6_addr[10] = 0xFF
            pi6.ipi6_addr.s6_addr[11] = 0xFF
            memcpy(pi6.ipi6_addr.s6_addr + 12, a.local_addr, 4)
        else:
            memcpy(pi6.ipi6_addr.s6_addr, a.local_addr, 16)
            pi6.ipi6_ifindex = <unsigned int>a.local_ifindex
        m.msg_controllen = CMSG_SPACE(sizeof(in6_pktinfo))


cdef void flush_client(Worker* w) noexcept nogil:
    """Send the queued remote datagrams to their clients: one sendmmsg per client-facing
    socket run, across associations (each message names its own client)."""
    cdef int start = 0
    cdef int end
    while start < w.ctx:
        end = start + 1
        while end < w.ctx and w.txfd[end] == w.txfd[start]:
            end += 1
        send_run(w, start, end, False)
        start = end
    w.ctx = 0
    w.cslot = 0


cdef int write_socks5_header(unsigned char* out, unsigned char family, const unsigned char* addr,
                             unsigned int port) noexcept nogil:
    # RSV RSV FRAG=0 ATYP ADDR PORT (RFC 1928 section 7).
    cdef int alen = 4 if family == 4 else 16
    out[0] = 0
    out[1] = 0
    out[2] = 0
    out[3] = ATYP_IPV4 if family == 4 else ATYP_IPV6
    memcpy(out + 4, addr, <size_t>alen)
    put_u16(out + 4 + alen, port)
    return 4 + alen + 2


cdef void remote_readable(Worker* w, Endpoint* ep) noexcept nogil:
    """Datagrams from remote hosts: a header in front of each, then to the client.

    Over UDP the messages are queued (slots [0, w.cslot) of the arena hold them) and
    leave in flush_client, batched with other associations' when several remote sockets
    are ready in one epoll turn. Over TCP they are written at once.
    """
    cdef Assoc* a = ep.assoc
    cdef int rounds
    cdef int n
    cdef int i
    cdef int j
    cdef int k
    cdef int err
    cdef int base
    cdef int room
    cdef int ntcp
    cdef Slot* s
    cdef unsigned char family
    cdef unsigned char addr[16]
    cdef unsigned int port
    cdef size_t plen
    cdef Py_ssize_t hlen
    cdef unsigned char* hdr
    cdef Dest* d
    cdef unsigned char* first
    cdef iovec wv[MAX_BATCH]
    cdef unsigned int wpay[MAX_BATCH]
    for rounds in range(PORT_ROUNDS):
        if a.reason != END_LIVE:
            return
        if w.engine.batch - w.cslot < (w.engine.batch + 3) // 4:
            flush_client(w)
        base = w.cslot
        room = w.engine.batch - base
        setup_rx(w, base, room, False)
        n = recvmmsg(ep.fd, &w.rx[base], <unsigned int>room, MSG_DONTWAIT, NULL)
        if n < 0:
            err = errno
            if err == ECONNREFUSED or err == EHOSTUNREACH or err == ENETUNREACH or err == EHOSTDOWN \
                    or err == ENETDOWN or err == EINTR:
                # A pending ICMP error returned once (IP_RECVERR): read on.
                continue
            return
        if n == 0:
            return
        if a.state == ST_UNMAPPED or (a.state != ST_TCP and a.tx_off < a.tx_len):
            # UDP-04: nothing goes to the client before the Confirmation is out.
            for j in range(n):
                count_drop(w, a, D_UNCONFIRMED)
            if n < room:
                return
            continue
        ntcp = 0
        for j in range(n):
            i = base + j
            s = &w.slots[i]
            if w.rx[i].msg_hdr.msg_flags & MSG_TRUNC:
                count_drop(w, a, D_TOO_BIG)
                continue
            if not sa_key(&s.peer, &family, addr, &port):
                count_drop(w, a, D_SOURCE)
                continue
            d = dest_find(a, family, addr, port)
            if d != NULL and d.verdict == V_DENY:
                count_drop(w, a, D_DENIED)
                continue
            if not a.server_mode and (d == NULL or not d.contacted):
                # Only destinations the client sent to answer, until server mode (UDP-06).
                count_drop(w, a, D_FILTERED)
                continue
            plen = w.rx[i].msg_len
            first = s.buf + HEADROOM
            if a.socks5:
                hlen = 4 + (4 if family == 4 else 16) + 2
                hdr = first - hlen
                write_socks5_header(hdr, family, addr, port)
            else:
                hlen = DGRAM_ADDRESS_OFFSET + (4 if family == 4 else 16)
                if <size_t>hlen + plen > MAX_MESSAGE:
                    count_drop(w, a, D_TOO_BIG)
                    continue
                hdr = first - hlen
                # The header goes into the headroom right in front of the payload (in place).
                if write_datagram_header(hdr, hlen, a.aid, ATYP_IPV4 if family == 4 else ATYP_IPV6,
                                         addr, 4 if family == 4 else 16, port,
                                         <unsigned int>(hlen + plen)) < 0:
                    count_drop(w, a, D_MALFORMED)
                    continue
            s.iov.iov_base = hdr
            s.iov.iov_len = <size_t>hlen + plen
            if a.state == ST_UDP:
                # Queue index k <= slot index i: tx[k] points at slot i's iovec and control space.
                k = w.ctx
                memset(&w.tx[k], 0, sizeof(mmsghdr))
                w.tx[k].msg_hdr.msg_name = &a.client
                w.tx[k].msg_hdr.msg_namelen = a.client_len
                w.tx[k].msg_hdr.msg_iov = &s.iov
                w.tx[k].msg_hdr.msg_iovlen = 1
                put_pktinfo(a, &w.tx[k].msg_hdr, s.ctl)
                w.txfd[k] = a.map_ep.fd
                w.txowner[k] = a
                w.txpay[k] = <unsigned int>plen
                w.ctx += 1
            elif a.state == ST_CHANNEL:
                # One at a time: each is one DTLS record (the slot stays free for the next).
                if channel_to_client(w, a, hdr, <size_t>hlen + plen):
                    a.r2c_dgrams += 1
                    a.r2c_bytes += plen
            else:
                # UDP over TCP: one iovec per message, all in one sendmsg below.
                wv[ntcp] = s.iov
                wpay[ntcp] = <unsigned int>plen
                ntcp += 1
        if a.state == ST_UDP:
            w.cslot = base + n  # these slots hold queued messages until flush_client
        elif ntcp > 0:
            tcp_send_messages(w, a, wv, wpay, ntcp)
        if n < room:
            return


# ---------------------------------------------------------------------------
# The TCP connection: reading (UDP over TCP, or the SOCKS 5 control connection)

cdef int tcp_message(Worker* w, Assoc* a, const unsigned char* q, size_t mlen) noexcept nogil:
    """One whole message read from the client's TCP connection. 0, or -1 if the association ended."""
    cdef DatagramHeaderView hv
    cdef Py_ssize_t r
    cdef size_t plen
    cdef bint first
    cdef bint probe
    if q[1] != S6_DATAGRAM:
        # Clients send only Datagrams ("Clients MUST NOT send Datagram Error messages").
        count_drop(w, a, D_MALFORMED)
        return 0
    r = parse_datagram_header(q, <Py_ssize_t>mlen, &hv)
    if r < 0:
        count_drop(w, a, parse_drop_reason(r))
        return 0
    if memcmp(hv.association_id, a.aid, 8) != 0:
        count_drop(w, a, D_UNKNOWN_ASSOCIATION)
        return 0
    if a.state == ST_UDP or a.state == ST_CHANNEL:
        count_drop(w, a, D_MAPPING)
        return 0
    plen = mlen - <size_t>r
    probe = is_server_probe(&hv, plen)
    if probe:
        a.server_mode = True
    if a.state == ST_UNMAPPED:
        a.state = ST_TCP
        confirm(w, a, True, probe)
        if a.reason != END_LIVE:
            return -1
    if probe:
        return 0
    queue_remote(w, a, q + r, plen, hv.address_type, hv.address, hv.address_length, hv.port, NULL)
    return 0


cdef void tcp_readable(Worker* w, Assoc* a) noexcept nogil:
    cdef unsigned char* buf = w.tcpbuf
    cdef size_t have
    cdef size_t pos
    cdef size_t mlen
    cdef ssize_t n
    cdef int reads
    cdef char cause[96]
    for reads in range(16):
        if a.reason != END_LIVE:
            return
        have = a.rx_len
        if have:
            # Cast: the carried partial message goes in front of the new bytes.
            memcpy(buf, a.rx, have)
        n = read(a.tcp.fd, buf + have, TCP_CHUNK)
        if n < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return
            end_assoc(w, a, END_RESET if errno == ECONNRESET else END_ERROR, b"TCP connection failed")
            return
        if n == 0:
            # UDP-07: "The UDP association remains active for as long as the TCP
            # connection between the client and the proxy is kept open."
            end_assoc(w, a, END_EOF, NULL)
            return
        if a.socks5:
            continue  # RFC 1928: nothing is expected on the control connection; discard
        have += <size_t>n
        pos = 0
        w.ntx = 0
        while have - pos >= 4:
            if buf[pos] != S6_VERSION:
                flush_remote(w)
                end_assoc(w, a, END_ERROR, b"a message on the TCP connection is not version 6")
                return
            mlen = get_u16(buf + pos + 2)
            if mlen < S6_MIN_MESSAGE:
                flush_remote(w)
                end_assoc(w, a, END_ERROR, b"a message on the TCP connection is shorter than 12 bytes")
                return
            if have - pos < mlen:
                break
            if tcp_message(w, a, buf + pos, mlen) < 0:
                return
            pos += mlen
        # The queued payloads point into buf: send them before it is reused.
        flush_remote(w)
        a.rx_len = have - pos
        if a.rx_len:
            if a.rx == NULL:
                # At most one partial message (< 64 KiB) is carried per association.
                a.rx = <unsigned char*>malloc(TCP_CHUNK)
                if a.rx == NULL:
                    end_assoc(w, a, END_ERROR, b"out of memory")
                    return
            memcpy(a.rx, buf + pos, a.rx_len)


# ---------------------------------------------------------------------------
# ICMP errors (UDP-09, D17)

cdef void send_error_message(Worker* w, Assoc* a, const sockaddr_storage* orig,
                             const sockaddr* offender, int code) noexcept nogil:
    """A Datagram Error message (section "Reporting ICMP Errors") on the mapped channel."""
    cdef unsigned char family
    cdef unsigned char addr[16]
    cdef unsigned int port
    cdef unsigned char rfamily
    cdef unsigned char raddr[16]
    cdef unsigned int rport
    cdef sockaddr_storage rep
    cdef unsigned char* out = w.emsg
    cdef int alen
    cdef int ralen
    cdef int total
    cdef msghdr m
    cdef iovec v
    cdef unsigned char ctl[CTL_SIZE]
    cdef unsigned int pay = 0
    cdef uint64_t before
    if not sa_key(orig, &family, addr, &port):
        return
    memset(&rep, 0, sizeof(rep))
    if offender.sa_family == AF_INET:
        memcpy(&rep, offender, sizeof(sockaddr_in))
    elif offender.sa_family == AF_INET6:
        memcpy(&rep, offender, sizeof(sockaddr_in6))
    if not sa_key(&rep, &rfamily, raddr, &rport):
        return
    if code == 4 and (family != 6 or rfamily != 6):
        return  # "Datagram too big (IPv6 only)"
    alen = 4 if family == 4 else 16
    ralen = 4 if rfamily == 4 else 16
    total = DGRAM_ADDRESS_OFFSET + alen + 4 + ralen
    out[0] = S6_VERSION
    out[1] = S6_ERROR
    put_u16(out + 2, <unsigned int>total)
    memcpy(out + 4, a.aid, 8)
    out[12] = ATYP_IPV4 if family == 4 else ATYP_IPV6
    out[13] = 0
    put_u16(out + 14, port)
    memcpy(out + DGRAM_ADDRESS_OFFSET, addr, <size_t>alen)
    out[DGRAM_ADDRESS_OFFSET + alen] = ATYP_IPV4 if rfamily == 4 else ATYP_IPV6
    out[DGRAM_ADDRESS_OFFSET + alen + 1] = <unsigned char>code
    out[DGRAM_ADDRESS_OFFSET + alen + 2] = 0
    out[DGRAM_ADDRESS_OFFSET + alen + 3] = 0
    memcpy(out + DGRAM_ADDRESS_OFFSET + alen + 4, raddr, <size_t>ralen)
    v.iov_base = out
    v.iov_len = <size_t>total
    if a.state == ST_TCP:
        before = a.r2c_dgrams
        tcp_send_messages(w, a, &v, &pay, 1)
        if a.r2c_dgrams > before:
            # Sent: an Error message, not a relayed datagram.
            a.r2c_dgrams = before
            a.icmp_reported += 1
        return
    if a.state == ST_CHANNEL:
        if channel_to_client(w, a, out, <size_t>total):
            a.icmp_reported += 1
        return
    memset(&m, 0, sizeof(m))
    m.msg_name = &a.client
    m.msg_namelen = a.client_len
    m.msg_iov = &v
    m.msg_iovlen = 1
    put_pktinfo(a, &m, ctl)
    if sendmsg(a.map_ep.fd, &m, MSG_DONTWAIT) >= 0:
        a.icmp_reported += 1


cdef void read_errqueue(Worker* w, Endpoint* ep) noexcept nogil:
    cdef Assoc* a = ep.assoc
    cdef msghdr m
    cdef iovec v
    cdef cmsghdr* c
    cdef sock_extended_err* ee
    cdef int code
    cdef int rounds
    for rounds in range(64):
        if a.reason != END_LIVE:
            return
        memset(&m, 0, sizeof(m))
        v.iov_base = w.eq_buf
        v.iov_len = 64
        m.msg_name = &w.eq_name
        m.msg_namelen = sizeof(sockaddr_storage)
        m.msg_iov = &v
        m.msg_iovlen = 1
        m.msg_control = w.eq_ctl
        m.msg_controllen = ERRQ_CTL_SIZE
        if recvmsg(ep.fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0:
            return  # EAGAIN: the queue is empty
        c = CMSG_FIRSTHDR(&m)
        while c != NULL:
            if ((c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_RECVERR)
                    or (c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_RECVERR)):
                # Cast: the kernel put a sock_extended_err (then the offender) here.
                ee = <sock_extended_err*>CMSG_DATA(c)
                if ee.ee_origin == SO_EE_ORIGIN_ICMP or ee.ee_origin == SO_EE_ORIGIN_ICMP6:
                    a.icmp_errors += 1
                    code = icmp_lookup(ee.ee_origin == SO_EE_ORIGIN_ICMP6, ee.ee_type, ee.ee_code)
                    # D17: only on the mapped channel; UDP-09: only after the opt-in.
                    if code and a.udp_error and a.state != ST_UNMAPPED:
                        send_error_message(w, a, &w.eq_name, SO_EE_OFFENDER(ee), code)
            c = CMSG_NXTHDR(&m, c)


# ---------------------------------------------------------------------------
# The worker thread

cdef bint register_fd(Worker* w, Endpoint* ep, unsigned int events) noexcept nogil:
    cdef epoll_event ev
    ev.events = events
    # The event carries the Endpoint (void* in the epoll union).
    ev.data.ptr = <void*>ep
    return epoll_ctl(w.epfd, EPOLL_CTL_ADD, ep.fd, &ev) == 0


cdef void adopt(Worker* w, Assoc* a) noexcept nogil:
    cdef int i
    cdef bint ok
    a.worker = w
    if not table_insert(w, a):
        end_assoc(w, a, END_ERROR, b"out of memory")
        return
    ok = register_fd(w, &a.tcp, EPOLLIN | EPOLLRDHUP)
    if ok and a.s5.fd >= 0:
        ok = register_fd(w, &a.s5, EPOLLIN)
    for i in range(a.nremote):
        if ok:
            ok = register_fd(w, &a.remote[i], EPOLLIN)
    if not ok:
        end_assoc(w, a, END_ERROR, b"epoll_ctl failed")
        return
    if w.engine.first_ms > 0:
        a.deadline_ms = w.now_ms + w.engine.first_ms
        a.waiting = True
        a.wait_prev = w.wait_tail
        a.wait_next = NULL
        if w.wait_tail != NULL:
            w.wait_tail.wait_next = a
        else:
            w.wait_head = a
        w.wait_tail = a
    # tcp_send (e.g. the Association Initialization) leaves only now, when the table
    # has the ID: the client's first datagram always finds its association.
    if a.tx_len:
        tcp_flush(w, a)
    # Bytes the control plane read past the request are the first TCP bytes.
    if a.reason == END_LIVE and a.rx_len and not a.socks5:
        tcp_carried(w, a)


cdef void tcp_carried(Worker* w, Assoc* a) noexcept nogil:
    """Process whole messages among the bytes handed over with add(tcp_pending=...)."""
    cdef size_t have = a.rx_len
    cdef size_t pos = 0
    cdef size_t mlen
    memcpy(w.tcpbuf, a.rx, have)
    w.ntx = 0
    while have - pos >= 4:
        if w.tcpbuf[pos] != S6_VERSION or get_u16(w.tcpbuf + pos + 2) < S6_MIN_MESSAGE:
            end_assoc(w, a, END_ERROR, b"unframeable bytes on the TCP connection")
            return
        mlen = get_u16(w.tcpbuf + pos + 2)
        if have - pos < mlen:
            break
        if tcp_message(w, a, w.tcpbuf + pos, mlen) < 0:
            return
        pos += mlen
    flush_remote(w)
    a.rx_len = have - pos
    if a.rx_len:
        memcpy(a.rx, w.tcpbuf + pos, a.rx_len)


cdef void apply_command(Worker* w, Cmd* c) noexcept nogil:
    cdef Assoc* a
    cdef Dest* d
    cdef Name* nm
    cdef Channel* ch
    if c.kind == CMD_REMOVE_CHANNEL:
        # Housed here, or on its way here (then adopt_channel sees remove_requested).
        ch = w.chans
        while ch != NULL and ch.id != c.channel_id:
            ch = ch.wnext
        if ch != NULL:
            end_channel(w, ch, b"removed", True)
        return
    a = table_find(w, id_key(c.aid))
    if a == NULL or a.reason != END_LIVE:
        return  # ended meanwhile: nothing to do
    if c.kind == CMD_REMOVE:
        end_assoc(w, a, END_SHUTDOWN, NULL)
    elif c.kind == CMD_VERDICT:
        d = dest_find(a, c.family, c.addr, c.port)
        if d == NULL:
            d = dest_add(a, c.family, c.addr, c.port, V_ALLOW if c.allow else V_DENY)
        if d != NULL:
            d.verdict = V_ALLOW if c.allow else V_DENY
        release_held(w, a)
    elif c.kind == CMD_RESOLVED:
        nm = name_find(a, c.name, c.name_len)
        if nm == NULL:
            nm = name_add(a, c.name, c.name_len)
        if nm != NULL:
            if c.family == 0:
                nm.state = N_FAILED
            else:
                nm.state = N_RESOLVED
                nm.family = c.family
                memcpy(nm.addr, c.addr, 16)
        release_held(w, a)


cdef bint take_control(Worker* w) noexcept nogil:
    """Adopt new associations and apply commands, in order. True when asked to stop."""
    cdef Assoc* inbox
    cdef Assoc* a
    cdef Assoc* rev = NULL
    cdef Assoc* nxt
    cdef Cmd* cmds
    cdef Cmd* c
    cdef Cmd* crev = NULL
    cdef Cmd* cnext
    cdef Channel* chans
    cdef Channel* chrev = NULL
    cdef Channel* chnext
    cdef bint stop
    clear_fd(w.wakefd)
    pthread_mutex_lock(&w.lock)
    inbox = w.inbox
    w.inbox = NULL
    chans = w.chan_inbox
    w.chan_inbox = NULL
    cmds = w.cmds
    w.cmds = NULL
    stop = w.stop
    pthread_mutex_unlock(&w.lock)
    # Both lists were pushed at the head: reverse them into arrival order.
    a = inbox
    while a != NULL:
        nxt = a.next
        a.next = rev
        rev = a
        a = nxt
    while rev != NULL:
        nxt = rev.next
        rev.next = NULL
        adopt(w, rev)
        rev = nxt
    while chans != NULL:
        chnext = chans.next
        chans.next = chrev
        chrev = chans
        chans = chnext
    while chrev != NULL:
        chnext = chrev.next
        chrev.next = NULL
        adopt_channel(w, chrev)
        chrev = chnext
    c = cmds
    while c != NULL:
        cnext = c.next
        c.next = crev
        crev = c
        c = cnext
    while crev != NULL:
        cnext = crev.next
        apply_command(w, crev)
        free(crev)
        crev = cnext
    return stop


cdef void flush_events(Worker* w) noexcept nogil:
    """Move this turn's events to the engine's list and wake the asyncio loop."""
    cdef Engine* e = w.engine
    if w.ev_head == NULL:
        return
    pthread_mutex_lock(&e.lock)
    if e.done_tail != NULL:
        e.done_tail.next = w.ev_head
    else:
        e.done_head = w.ev_head
    e.done_tail = w.ev_tail
    e.active -= w.nended
    pthread_mutex_unlock(&e.lock)
    w.ev_head = NULL
    w.ev_tail = NULL
    w.nended = 0
    wake_fd(e.donefd)


cdef void expire_waiting(Worker* w) noexcept nogil:
    # FIFO with one timeout for all: the head is the oldest.
    while w.wait_head != NULL and w.wait_head.deadline_ms <= w.now_ms:
        end_assoc(w, w.wait_head, END_IDLE, b"no datagram within the first-datagram timeout (UDP-07)")


cdef int wait_timeout(Worker* w) noexcept nogil:
    cdef int64_t left
    cdef int64_t deadline
    if w.wait_head == NULL and w.cwait_head == NULL:
        return -1
    if w.wait_head == NULL:
        deadline = w.cwait_head.deadline_ms
    elif w.cwait_head == NULL or w.wait_head.deadline_ms < w.cwait_head.deadline_ms:
        deadline = w.wait_head.deadline_ms
    else:
        deadline = w.cwait_head.deadline_ms
    left = deadline - monotonic_ms()
    if left < 0:
        return 0
    # +1: the coarse clock may still read the old tick when we wake exactly on time.
    return <int>(left + 1) if left < 3600000 else 3600000


cdef void tcp_event(Worker* w, Assoc* a, unsigned int events) noexcept nogil:
    if events & EPOLLOUT:
        tcp_flush(w, a)
    if a.reason == END_LIVE and events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        tcp_readable(w, a)


cdef void* worker_main(void* arg) noexcept nogil:
    # pthread start routine: arg is the Worker* given to pthread_create.
    cdef Worker* w = <Worker*>arg
    cdef epoll_event events[MAX_EVENTS]
    cdef int n
    cdef int i
    cdef unsigned int what
    cdef Endpoint* ep
    cdef bint stop = False
    cdef unsigned int j
    cdef Assoc* live
    cdef Assoc* nxt
    cdef int err
    cdef socklen_t errlen
    # Visible in top -H, perf and /proc/<pid>/task/*/comm (15 chars max).
    pthread_setname_np(pthread_self(), b"socks6fast-udp")
    w.now_ms = monotonic_ms()
    while not stop:
        n = epoll_wait(w.epfd, events, MAX_EVENTS, wait_timeout(w))
        w.now_ms = monotonic_ms()
        if n < 0:
            if errno == EINTR:
                continue
            break  # our epoll fd is broken: nothing can be relayed any more
        for i in range(n):
            if events[i].data.ptr == NULL:
                flush_client(w)  # commands may end associations the queue names
                stop = take_control(w)
                continue
            # The data pointer is the Endpoint registered for this fd.
            ep = <Endpoint*>events[i].data.ptr
            what = events[i].events
            if ep.kind != EP_REMOTE and w.ctx:
                # Client datagrams and TCP reads use the arena from slot 0: send the queue first.
                flush_client(w)
            if ep.kind == EP_CHANNEL:
                if ep.channel.ended:
                    continue  # ended earlier in this batch; the struct lives until drain()
                if what & EPOLLERR:
                    # ECONNREFUSED of an earlier send (the client's port is closed): clear it.
                    err = 0
                    errlen = sizeof(err)
                    getsockopt(ep.fd, SOL_SOCKET, SO_ERROR, &err, &errlen)
                if what & EPOLLIN:
                    channel_readable(w, ep.channel)
                continue
            if ep.kind != EP_PORT and ep.assoc.reason != END_LIVE:
                continue  # ended earlier in this batch; the struct lives until the flush
            if ep.kind == EP_TCP:
                tcp_event(w, ep.assoc, what)
                continue
            if what & EPOLLERR:
                if ep.kind == EP_REMOTE and ep.assoc.udp_error:
                    read_errqueue(w, ep)
                # Clear a pending socket error, or level-triggered EPOLLERR would repeat.
                err = 0
                errlen = sizeof(err)
                getsockopt(ep.fd, SOL_SOCKET, SO_ERROR, &err, &errlen)
            if not what & EPOLLIN:
                continue
            if ep.kind == EP_REMOTE:
                remote_readable(w, ep)
            else:
                client_readable(w, ep)
        flush_client(w)
        expire_waiting(w)
        expire_channels(w)
        flush_events(w)
    # Stop (or a broken epoll set): refuse new work, adopt the inbox, end everything.
    pthread_mutex_lock(&w.lock)
    w.stop = True
    pthread_mutex_unlock(&w.lock)
    take_control(w)
    end_all_channels(w)  # "removed" (engine close), before their associations end
    # Collect first: ending one shifts others around in the table.
    live = NULL
    for j in range(w.tcap):
        if w.table[j] != NULL:
            w.table[j].next = live
            live = w.table[j]
    while live != NULL:
        nxt = live.next
        end_assoc(w, live, END_SHUTDOWN if stop else END_ERROR, NULL)
        live = nxt
    flush_events(w)
    return NULL


# ---------------------------------------------------------------------------
# Engine set-up and tear-down

cdef void stop_workers(Engine* e) noexcept nogil:
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


cdef void free_assoc(Assoc* a) noexcept nogil:
    free(a.rx)
    free(a.tx)
    free(a.dests)
    free(a.names)
    free_held(a.held_head)
    free(a)


cdef void close_assoc_fds(Assoc* a) noexcept nogil:
    cdef int i
    if a.tcp.fd >= 0:
        close(a.tcp.fd)
        a.tcp.fd = -1
    if a.s5.fd >= 0:
        close(a.s5.fd)
        a.s5.fd = -1
    for i in range(a.nremote):
        if a.remote[i].fd >= 0:
            close(a.remote[i].fd)
            a.remote[i].fd = -1


cdef void release_workers(Engine* e) noexcept nogil:
    """Close every worker fd and port, free the arenas (workers must be stopped)."""
    cdef int i
    cdef int j
    cdef Worker* w
    cdef Assoc* a
    cdef Assoc* nxt
    cdef Cmd* c
    cdef Cmd* cn
    cdef Event* ev
    cdef Channel* ch
    cdef Channel* chn
    for i in range(e.nworkers):
        for j in range(NDROPS):
            e.final_drops[j] += e.workers[i].drops[j]
    for i in range(e.nworkers):
        w = &e.workers[i]
        # A worker that never started may still hold associations in its inbox.
        a = w.inbox
        w.inbox = NULL
        while a != NULL:
            nxt = a.next
            close_assoc_fds(a)
            a.reason = END_SHUTDOWN
            ev = new_event(w, EV_ENDED, a.aid)
            if ev != NULL:
                ev.assoc = a
                w.nended += 1
            a = nxt
        ch = w.chan_inbox
        w.chan_inbox = NULL
        while ch != NULL:
            chn = ch.next
            if ch.ep.fd >= 0:
                close(ch.ep.fd)
                ch.ep.fd = -1
            ch.ended = True
            strcpy_cause(ch.cause, b"removed")
            free(ch.pending)
            ch.pending = NULL
            ev = new_event(w, EV_CHANNEL_ENDED, NO_ID)
            if ev != NULL:
                ev.channel = ch
            ch = chn
        flush_events(w)
        c = w.cmds
        w.cmds = NULL
        while c != NULL:
            cn = c.next
            free(c)
            c = cn
        for j in range(w.nports):
            if w.ports[j].fd >= 0:
                close(w.ports[j].fd)
            free(w.ports[j])
        w.nports = 0
        free(w.table)
        w.table = NULL
        w.tcap = 0
        free(w.slots)
        w.slots = NULL
        free(w.arena)
        w.arena = NULL
        free(w.rx)
        w.rx = NULL
        free(w.tx)
        w.tx = NULL
        free(w.txfd)
        w.txfd = NULL
        free(w.txowner)
        w.txowner = NULL
        free(w.txpay)
        w.txpay = NULL
        free(w.tcpbuf)
        w.tcpbuf = NULL
        free(w.dtlsout)
        w.dtlsout = NULL
        free(w.dtlsin)
        w.dtlsin = NULL
        free(w.gtx)
        w.gtx = NULL
        free(w.giov)
        w.giov = NULL
        free(w.gfirst)
        w.gfirst = NULL
        free(w.gcount)
        w.gcount = NULL
        free(w.gctl)
        w.gctl = NULL
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


cdef int alloc_worker(Engine* e, Worker* w) noexcept nogil:
    """The worker's arena: batch slots of HEADROOM + max_datagram bytes. 0 or an errno."""
    cdef int i
    cdef size_t stride = <size_t>(HEADROOM + e.max_datagram)
    # calloc: zeroed headers and counters.
    w.slots = <Slot*>calloc(<size_t>e.batch, sizeof(Slot))
    w.arena = <unsigned char*>malloc(stride * <size_t>e.batch)
    w.rx = <mmsghdr*>calloc(<size_t>e.batch, sizeof(mmsghdr))
    w.tx = <mmsghdr*>calloc(<size_t>e.batch, sizeof(mmsghdr))
    w.txfd = <int*>calloc(<size_t>e.batch, sizeof(int))
    w.txowner = <Assoc**>calloc(<size_t>e.batch, sizeof(Assoc*))
    w.txpay = <unsigned int*>calloc(<size_t>e.batch, sizeof(unsigned int))
    w.tcpbuf = <unsigned char*>malloc(2 * TCP_CHUNK)
    w.dtlsout = <unsigned char*>malloc(DTLS_BUF)
    w.dtlsin = <unsigned char*>malloc(DTLS_BUF)
    w.gtx = <mmsghdr*>calloc(<size_t>e.batch, sizeof(mmsghdr))
    w.giov = <iovec*>calloc(<size_t>e.batch, sizeof(iovec))
    w.gfirst = <int*>calloc(<size_t>e.batch, sizeof(int))
    w.gcount = <int*>calloc(<size_t>e.batch, sizeof(int))
    w.gctl = <unsigned char*>calloc(<size_t>e.batch, GCTL_SIZE)
    w.gso = e.gso
    if (w.slots == NULL or w.arena == NULL or w.rx == NULL or w.tx == NULL or w.txfd == NULL
            or w.txowner == NULL or w.txpay == NULL or w.tcpbuf == NULL or w.gtx == NULL
            or w.dtlsout == NULL or w.dtlsin == NULL
            or w.giov == NULL or w.gfirst == NULL or w.gcount == NULL or w.gctl == NULL):
        return 12  # ENOMEM
    for i in range(e.batch):
        w.slots[i].buf = w.arena + stride * <size_t>i
    return 0


cdef int start_engine(Engine* e, int nworkers) noexcept nogil:
    """Create the workers' fds, arenas and threads. 0, or an errno value (e is left for release)."""
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
        w.index = i
        w.epfd = -1
        w.wakefd = -1
        pthread_mutex_init(&w.lock, NULL)
    for i in range(nworkers):
        w = &e.workers[i]
        rc = alloc_worker(e, w)
        if rc != 0:
            return rc
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


cdef void free_events(Engine* e) noexcept nogil:
    cdef Event* ev = e.done_head
    cdef Event* nxt
    while ev != NULL:
        nxt = ev.next
        if ev.assoc != NULL:
            free_assoc(ev.assoc)
        if ev.channel != NULL:
            free(ev.channel.pending)
            free(ev.channel)
        free(ev.data)
        free(ev)
        ev = nxt
    e.done_head = NULL
    e.done_tail = NULL


# ---------------------------------------------------------------------------
# Python side

cdef int _sock_int(int fd, int level, int name) except? -2:
    cdef int value = 0
    cdef socklen_t size = sizeof(value)
    if getsockopt(fd, level, name, &value, &size) < 0:
        raise OSError(errno, os.strerror(errno))
    return value


cdef int _set_int(int fd, int level, int name, int value) except -1:
    if setsockopt(fd, level, name, &value, sizeof(value)) < 0:
        raise OSError(errno, os.strerror(errno))
    return 0


cdef int _nonblocking(int fd) except -1:
    cdef int flags = fcntl(fd, F_GETFL)
    if flags < 0:
        raise OSError(errno, os.strerror(errno))
    if not (flags & O_NONBLOCK) and fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0:
        raise OSError(errno, os.strerror(errno))
    return 0


cdef int _udp_endpoint(Endpoint* ep, int fd, int kind, Assoc* a) except -1:
    """Check that fd is a UDP socket and describe it (family, v6only, wildcard)."""
    cdef sockaddr_storage ss
    cdef socklen_t size = sizeof(ss)
    cdef unsigned char family
    cdef unsigned char addr[16]
    cdef unsigned int port
    if fd < 0:
        raise ValueError(f"not an open fd: {fd}")
    if _sock_int(fd, SOL_SOCKET, SO_TYPE) != SOCK_DGRAM:
        raise ValueError(f"fd {fd} is not a datagram socket")
    ep.kind = kind
    ep.fd = fd
    ep.assoc = a
    ep.family = _sock_int(fd, SOL_SOCKET, SO_DOMAIN)
    if ep.family != AF_INET and ep.family != AF_INET6:
        raise ValueError(f"fd {fd} is not an IPv4 or IPv6 socket")
    ep.v6only = ep.family == AF_INET6 and _sock_int(fd, IPPROTO_IPV6, IPV6_V6ONLY) != 0
    memset(&ss, 0, sizeof(ss))
    # Cast: getsockname fills the storage with the socket's address.
    if getsockname(fd, <sockaddr*>&ss, &size) < 0:
        raise OSError(errno, os.strerror(errno))
    ep.wildcard = sa_key(&ss, &family, addr, &port) and all_zero(addr, 4 if family == 4 else 16)
    return 0


def _pack_address(str address):
    """(family 4|6, 16 address bytes) of an IP address text; IPv4-mapped IPv6 -> IPv4."""
    try:
        raw = socket.inet_pton(socket.AF_INET, address)
        return 4, raw + bytes(12)
    except OSError:
        pass
    try:
        raw = socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        raise ValueError(f"not an IP address: {address!r}") from None
    if raw[:12] == bytes(10) + b"\xff\xff":
        return 4, raw[12:] + bytes(12)
    return 6, raw


cdef str _address_text(unsigned char family, const unsigned char* addr):
    # Cast: 4 or 16 address bytes as a bytes object for inet_ntop.
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, (<const char*>addr)[:4])
    return socket.inet_ntop(socket.AF_INET6, (<const char*>addr)[:16])


cdef bytes _check_id(object association_id):
    if not isinstance(association_id, bytes) or len(association_id) != 8:
        raise ValueError("association_id must be 8 bytes")
    return association_id


cdef int _load_openssl() except -1:
    """Take OpenSSL's functions from the library pyOpenSSL uses, once (see _openssl.pxd)."""
    global SSLAPI_READY
    if SSLAPI_READY:
        return 0
    try:
        from OpenSSL._util import ffi, lib

        def address(function):
            return int(ffi.cast("uintptr_t", ffi.cast("void*", function)))

        SSLAPI.SSL_read = <ssl_read_t><uintptr_t>address(lib.SSL_read)
        SSLAPI.SSL_write = <ssl_write_t><uintptr_t>address(lib.SSL_write)
        SSLAPI.SSL_get_error = <ssl_get_error_t><uintptr_t>address(lib.SSL_get_error)
        SSLAPI.SSL_shutdown = <ssl_shutdown_t><uintptr_t>address(lib.SSL_shutdown)
        SSLAPI.BIO_write = <bio_write_t><uintptr_t>address(lib.BIO_write)
        SSLAPI.BIO_read = <bio_read_t><uintptr_t>address(lib.BIO_read)
        SSLAPI.ERR_clear_error = <err_clear_error_t><uintptr_t>address(lib.ERR_clear_error)
    except Exception as exc:
        raise ValueError(
            "DTLS channels need the OpenSSL functions of pyOpenSSL's library "
            f"(OpenSSL._util.lib), which this pyOpenSSL does not expose: {exc}"
        ) from None
    SSLAPI_READY = True
    return 0


def _connection_pointers(connection):
    """(SSL*, read BIO*, write BIO*) of a pyOpenSSL Connection over memory BIOs, as ints."""
    from OpenSSL._util import ffi

    try:
        ssl, into, out = connection._ssl, connection._into_ssl, connection._from_ssl
    except AttributeError:
        raise ValueError("the DTLS connection has no memory BIOs (made with a socket?)") from None
    if into is None or out is None:
        raise ValueError("the DTLS connection has no memory BIOs (made with a socket?)")
    return tuple(int(ffi.cast("uintptr_t", p)) for p in (ssl, into, out))


cdef bint _gso_supported() noexcept:
    """Whether the kernel takes UDP_SEGMENT (UDP GSO, Linux 4.18), probed on a scratch socket.

    SOCKS6FAST_UDP_GSO=0 turns it off (A/B measurements, or a kernel whose GSO path
    misbehaves). Sends fall back to one datagram at a time after an EIO or EINVAL anyway.
    """
    cdef int fd
    cdef int size = 1200
    cdef bint ok
    if os.environ.get("SOCKS6FAST_UDP_GSO", "1") == "0":
        return False
    fd = c_socket(AF_INET, SOCK_DGRAM, 0)
    if fd < 0:
        return False
    ok = setsockopt(fd, SOL_UDP, UDP_SEGMENT, &size, sizeof(size)) == 0
    close(fd)
    return ok


cdef class UdpEngine:
    """A pool of C worker threads relaying UDP associations with recvmmsg/sendmmsg.

    Args:
        workers: worker threads; 0 means one per CPU this process may run on.
        batch: datagrams per recvmmsg/sendmmsg call (1-256).
        max_datagram: largest datagram received (bytes, 512-65535); larger ones are
            dropped (``UdpDrop.TOO_BIG``). Each worker preallocates ``batch`` buffers of it.
        first_datagram_timeout: seconds an association may wait for its first datagram
            before it ends with ``RelayEnd.IDLE_TIMEOUT`` (UDP-07); 0 disables it.
        hold_datagrams: datagrams each association may hold while their destination
            waits for a verdict or a name (D24; 0-256, 0 drops them all as PENDING).
        hold_bytes: payload bytes each association may hold that way (0-1048576).
        loop: ignored (the Python twin runs on this event loop; the threads need none).

    Raises:
        ValueError: an argument is out of range.
        OSError: the kernel refused an epoll set, an eventfd or a thread.
    """

    cdef Engine* _eng
    cdef bint _closed
    cdef set _live  # IDs added and not yet reported ended by drain()
    # Channels not yet reported ended by drain(): id -> (Channel* as an int, its DTLSLink or
    # None). The link keeps the pyOpenSSL Connection (its SSL*) alive while a worker uses it.
    cdef dict _channels
    cdef int _last_channel

    def __cinit__(self) -> None:
        self._eng = NULL
        self._closed = True
        self._live = set()
        self._channels = {}
        self._last_channel = 0

    def __init__(self, int workers=0, *, int batch=16, int max_datagram=65535,
                 double first_datagram_timeout=0.0, int hold_datagrams=HOLD_DATAGRAMS,
                 int hold_bytes=HOLD_BYTES, loop=None) -> None:
        cdef int rc
        cdef int nworkers
        if self._eng != NULL:
            raise RuntimeError("UdpEngine is already initialised")
        if workers < 0 or workers > MAX_WORKERS:
            raise ValueError(f"workers must be in 0..{MAX_WORKERS}, got {workers}")
        if batch < 1 or batch > MAX_BATCH:
            raise ValueError(f"batch must be in 1..{MAX_BATCH}, got {batch}")
        if max_datagram < 512 or max_datagram > MAX_MESSAGE:
            raise ValueError(f"max_datagram must be in 512..{MAX_MESSAGE}, got {max_datagram}")
        if not (0.0 <= first_datagram_timeout < 1e9):
            raise ValueError(f"first_datagram_timeout must be >= 0 seconds, got {first_datagram_timeout}")
        if hold_datagrams < 0 or hold_datagrams > MAX_HOLD_DATAGRAMS:
            raise ValueError(f"hold_datagrams must be in 0..{MAX_HOLD_DATAGRAMS}, got {hold_datagrams}")
        if hold_bytes < 0 or hold_bytes > MAX_HOLD_BYTES:
            raise ValueError(f"hold_bytes must be in 0..{MAX_HOLD_BYTES}, got {hold_bytes}")
        nworkers = workers or default_workers()  # half the usable cores, at least one (D33)
        # calloc: lists empty, counters zero.
        self._eng = <Engine*>calloc(1, sizeof(Engine))
        if self._eng == NULL:
            raise MemoryError()
        self._eng.donefd = -1
        self._eng.batch = batch
        self._eng.max_datagram = max_datagram
        self._eng.gso = _gso_supported()
        self._eng.hold_datagrams = <unsigned int>hold_datagrams
        self._eng.hold_bytes = <size_t>hold_bytes
        self._eng.first_ms = <int64_t>(first_datagram_timeout * 1000.0 + 0.5)
        if first_datagram_timeout > 0 and self._eng.first_ms == 0:
            self._eng.first_ms = 1
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
        cdef Engine* e = self._eng
        self._closed = True
        if e == NULL:
            return
        # Joining waits for the workers to end their associations; they never take the
        # GIL, so release it (the asyncio loop runs meanwhile).
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
        free_events(self._eng)
        pthread_mutex_destroy(&self._eng.lock)
        free(self._eng)
        self._eng = NULL

    cdef int _check_open(self) except -1:
        if self._closed:
            raise ValueError("UdpEngine is closed")
        return 0

    def fileno(self) -> int:
        """The eventfd that is readable while events wait for :meth:`drain`.

        Raises:
            ValueError: the engine is closed.
        """
        self._check_open()
        return self._eng.donefd

    @property
    def workers(self) -> int:
        """Number of worker threads (0 once closed)."""
        return 0 if self._closed else self._eng.nworkers

    @property
    def active(self) -> int:
        """Associations added and not yet ended (ended ones may still wait in drain())."""
        cdef int n
        if self._eng == NULL:
            return 0
        pthread_mutex_lock(&self._eng.lock)
        n = self._eng.active
        pthread_mutex_unlock(&self._eng.lock)
        return n

    def add_port(self, fds, *, bint steer=True) -> None:
        """Serve a client-facing SOCKS 6 UDP port (D16): one socket per worker.

        ``fds[i]`` goes to worker i. With several workers they must form one
        SO_REUSEPORT group, bound in this order (``socks6fast.dataplane.udp.open_udp_port``
        makes one); the engine attaches the BPF program that steers each datagram to the
        worker owning its association. ``steer=False``: the group is larger than this
        engine (``serve --workers N``, D34) and its owner attached the program already.
        The engine owns the sockets from a successful return on and closes them in
        :meth:`close`.

        Raises:
            ValueError: not one UDP socket per worker, or the engine is closed.
            OSError: a socket option was refused (then the caller still owns the fds).
        """
        cdef Engine* e = self._eng
        cdef sock_filter code[3]
        cdef sock_fprog prog
        cdef Endpoint* eps[MAX_WORKERS]
        cdef int i
        cdef int j
        cdef int fd
        cdef Worker* w
        cdef epoll_event ev
        self._check_open()
        fds = [int(x) for x in fds]
        if len(fds) != e.nworkers:
            raise ValueError(f"need one socket per worker ({e.nworkers}), got {len(fds)}")
        for i in range(e.nworkers):
            if e.workers[i].nports >= MAX_PORTS:
                raise ValueError(f"at most {MAX_PORTS} ports")
        for i in range(e.nworkers):
            eps[i] = NULL
        try:
            for i in range(e.nworkers):
                eps[i] = <Endpoint*>calloc(1, sizeof(Endpoint))
                if eps[i] == NULL:
                    raise MemoryError()
                _udp_endpoint(eps[i], fds[i], EP_PORT, NULL)
                _nonblocking(fds[i])
                if eps[i].wildcard:
                    # The 5-tuple includes the proxy's address (UDP-03): read it per datagram.
                    if eps[i].family == AF_INET:
                        _set_int(fds[i], IPPROTO_IP, IP_PKTINFO, 1)
                    else:
                        _set_int(fds[i], IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            if e.nworkers > 1 and steer:
                # A = payload[11] (the Association ID's last byte); A %= N; return A.
                code[0].code = BPF_LD | BPF_B | BPF_ABS
                code[0].jt = 0
                code[0].jf = 0
                code[0].k = 11
                code[1].code = BPF_ALU | BPF_MOD | BPF_K
                code[1].jt = 0
                code[1].jf = 0
                code[1].k = <unsigned int>e.nworkers
                code[2].code = BPF_RET | BPF_A
                code[2].jt = 0
                code[2].jf = 0
                code[2].k = 0
                prog.len = 3
                prog.filter = code
                if setsockopt(fds[0], SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog)) < 0:
                    raise OSError(errno, "SO_ATTACH_REUSEPORT_CBPF: " + os.strerror(errno))
            for i in range(e.nworkers):
                w = &e.workers[i]
                ev.events = EPOLLIN
                # The event carries the Endpoint (void* in the epoll union).
                ev.data.ptr = <void*>eps[i]
                if epoll_ctl(w.epfd, EPOLL_CTL_ADD, fds[i], &ev) < 0:
                    fd = errno
                    for j in range(i):
                        epoll_ctl(e.workers[j].epfd, EPOLL_CTL_DEL, fds[j], NULL)
                    raise OSError(fd, os.strerror(fd))
        except BaseException:
            for i in range(e.nworkers):
                free(eps[i])
            raise
        for i in range(e.nworkers):
            # Only the Python thread and the final teardown touch the port lists.
            e.workers[i].ports[e.workers[i].nports] = eps[i]
            e.workers[i].nports += 1

    def add(self, association_id, int tcp_fd, remote_fds, *, int socks5_fd=-1, client_address=None,
            int client_port=0, bint udp_error=False, bint ask=False, tcp_send=b"",
            tcp_pending=b"") -> None:
        """Relay one association until its TCP connection ends or :meth:`remove`.

        Args:
            association_id: 8 bytes, unique among live associations (D18). SOCKS 6
                datagrams name it; for SOCKS 5 it is only the control plane's key.
            tcp_fd: the client's TCP connection. The engine reads Datagram messages from
                it (UDP over TCP), writes the Confirmation, Datagrams and Errors on it,
                and ends the association when it closes (UDP-07). SOCKS 5: the control
                connection, watched for its end (what the client sends is discarded).
            remote_fds: the unconnected remote-facing UDP socket(s), at most one per
                family (an AF_INET6 socket without IPV6_V6ONLY also serves IPv4).
            socks5_fd: SOCKS 5 (RFC 1928 section 7): the association's client-facing UDP
                socket; -1 for SOCKS 6, whose datagrams arrive on :meth:`add_port` ports.
            client_address: accept the first datagram only from this IP address (D19:
                the TCP client's, for SOCKS 5); None accepts any.
            client_port: and only from this port (SOCKS 5: a non-zero DST.PORT); 0: any.
            udp_error: the client opted in to Datagram Error messages (UDP-09, D17).
            ask: report unknown destinations (``UdpAsk``) and drop their datagrams until
                :meth:`verdict`; False allows every destination.
            tcp_send: bytes the engine writes on the TCP connection first, once the
                association is in its table (e.g. the Association Initialization).
            tcp_pending: bytes the control plane already read from the TCP connection
                after the request; they are parsed as the first bytes received.

        The engine owns every fd from a successful return on, and closes them when the
        association ends; :meth:`drain` then reports ``UdpEnded``.

        Raises:
            ValueError: a bad argument, an ID in use, or the engine is closed.
            OSError: a socket option was refused (then the caller still owns the fds).
        """
        cdef bytes aid = _check_id(association_id)
        cdef Assoc* a
        cdef int i
        cdef int fd
        cdef Worker* w
        cdef bytes tx = bytes(tcp_send)
        cdef bytes pending = bytes(tcp_pending)
        self._check_open()
        if aid in self._live:
            raise ValueError(f"association {aid.hex()} is already live")
        remote_fds = [int(x) for x in remote_fds]
        if not 1 <= len(remote_fds) <= MAX_REMOTES:
            raise ValueError(f"need 1..{MAX_REMOTES} remote sockets, got {len(remote_fds)}")
        if tcp_fd < 0:
            raise ValueError(f"not an open fd: {tcp_fd}")
        if not 0 <= client_port <= 0xFFFF:
            raise ValueError(f"client_port out of range: {client_port}")
        if len(pending) > TCP_CHUNK - 1:
            raise ValueError("tcp_pending is longer than one message")
        every = [tcp_fd, socks5_fd, *remote_fds] if socks5_fd >= 0 else [tcp_fd, *remote_fds]
        if len(set(every)) != len(every):
            raise ValueError("the fds must be distinct")
        # calloc: counters 0, pointers NULL, state ST_UNMAPPED.
        a = <Assoc*>calloc(1, sizeof(Assoc))
        if a == NULL:
            raise MemoryError()
        try:
            memcpy(a.aid, <const char*>aid, 8)
            a.key = id_key(a.aid)
            a.reason = END_LIVE
            a.socks5 = socks5_fd >= 0
            a.udp_error = udp_error
            a.ask = ask
            a.tcp.kind = EP_TCP
            a.tcp.fd = tcp_fd
            a.tcp.assoc = a
            a.s5.fd = -1
            a.s5.assoc = a
            for i in range(MAX_REMOTES):
                a.remote[i].fd = -1
            if client_address is not None:
                family, packed = _pack_address(client_address)
                a.want_family = family
                memcpy(a.want_addr, <const char*>packed, 16)
            a.want_port = client_port
            for i, fd in enumerate(remote_fds):
                _udp_endpoint(&a.remote[i], fd, EP_REMOTE, a)
            a.nremote = len(remote_fds)
            if a.socks5:
                _udp_endpoint(&a.s5, socks5_fd, EP_S5, a)
                if a.s5.wildcard:
                    if a.s5.family == AF_INET:
                        _set_int(socks5_fd, IPPROTO_IP, IP_PKTINFO, 1)
                    else:
                        _set_int(socks5_fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            if udp_error:
                # UDP-09: ICMP errors for these sockets go to their error queues.
                for i in range(a.nremote):
                    _set_int(a.remote[i].fd, IPPROTO_IP, IP_RECVERR, 1)
                    if a.remote[i].family == AF_INET6:
                        _set_int(a.remote[i].fd, IPPROTO_IPV6, IPV6_RECVERR, 1)
            for fd in every:
                _nonblocking(fd)
            if tx and not tx_append(a, <const unsigned char*><const char*>tx, len(tx)):
                raise MemoryError()
            if pending:
                a.rx = <unsigned char*>malloc(TCP_CHUNK)
                if a.rx == NULL:
                    raise MemoryError()
                memcpy(a.rx, <const char*>pending, len(pending))
                a.rx_len = len(pending)
        except BaseException:
            free_assoc(a)
            raise
        # The worker that owns the ID: the one the port's BPF program steers it to.
        w = &self._eng.workers[a.aid[7] % self._eng.nworkers]
        pthread_mutex_lock(&self._eng.lock)
        self._eng.active += 1
        pthread_mutex_unlock(&self._eng.lock)
        # The worker holds this lock only to swap lists: taking it with the GIL held
        # cannot deadlock (workers never take the GIL).
        pthread_mutex_lock(&w.lock)
        if w.stop:
            pthread_mutex_unlock(&w.lock)
            pthread_mutex_lock(&self._eng.lock)
            self._eng.active -= 1
            pthread_mutex_unlock(&self._eng.lock)
            free_assoc(a)
            raise OSError(5, "UDP worker stopped")  # EIO: the worker's epoll set failed
        a.next = w.inbox
        w.inbox = a
        pthread_mutex_unlock(&w.lock)
        wake_fd(w.wakefd)
        self._live.add(aid)

    cdef int _command(self, Cmd* c) except -1:
        cdef Worker* w = &self._eng.workers[c.aid[7] % self._eng.nworkers]
        pthread_mutex_lock(&w.lock)
        c.next = w.cmds
        w.cmds = c
        pthread_mutex_unlock(&w.lock)
        wake_fd(w.wakefd)
        return 0

    cdef Cmd* _new_command(self, int kind, bytes aid) except NULL:
        cdef Cmd* c = <Cmd*>calloc(1, sizeof(Cmd))
        if c == NULL:
            raise MemoryError()
        c.kind = kind
        memcpy(c.aid, <const char*>aid, 8)
        return c

    def verdict(self, association_id, str address, int port, bint allow) -> None:
        """The control plane's verdict for datagrams of this association to (address, port).

        Answers a ``UdpAsk``, or sets a verdict ahead of time. Unknown or ended
        associations are ignored.

        Raises:
            ValueError: not an IP address, a port out of range, or the engine is closed.
        """
        cdef bytes aid = _check_id(association_id)
        cdef Cmd* c
        self._check_open()
        family, packed = _pack_address(address)
        if not 0 < port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
        c = self._new_command(CMD_VERDICT, aid)
        c.family = family
        memcpy(c.addr, <const char*>packed, 16)
        c.port = port
        c.allow = allow
        self._command(c)

    def resolved(self, association_id, str name, address) -> None:
        """Cache the address of a domain name for this association (D20); None: it failed.

        Raises:
            ValueError: a bad name or address, or the engine is closed.
        """
        cdef bytes aid = _check_id(association_id)
        cdef bytes raw = name.encode("utf-8")
        cdef Cmd* c
        self._check_open()
        if not 1 <= len(raw) <= 255:
            raise ValueError("name must be 1..255 bytes")
        packed = None
        if address is not None:
            family, packed = _pack_address(address)
        c = self._new_command(CMD_RESOLVED, aid)
        c.name_len = <unsigned char>len(raw)
        memcpy(c.name, <const char*>raw, len(raw))
        if packed is not None:
            c.family = family
            memcpy(c.addr, <const char*>packed, 16)
        self._command(c)

    def remove(self, association_id) -> None:
        """End one association now (``RelayEnd.SHUTDOWN``); unknown IDs are ignored."""
        cdef bytes aid = _check_id(association_id)
        if self._closed or aid not in self._live:
            return
        self._command(self._new_command(CMD_REMOVE, aid))

    def add_channel(self, int fd, dtls=None) -> int:
        """A client's own channel (the contract in ``socks6fast.dataplane.udp``): ``fd`` a
        UDP socket connected to the client, ``dtls`` a :class:`DTLSLink` or None. The engine
        owns ``fd`` from a successful return on. Returns the channel's id (never reused).

        Raises:
            ValueError: not a connected UDP socket, not a DTLSLink of an established
                pyOpenSSL Connection, OpenSSL's functions cannot be found, or the engine
                is closed (the caller still owns ``fd``).
        """
        cdef Channel* ch
        cdef Worker* w
        cdef int kind
        cdef int domain
        cdef int limit = MAX_MESSAGE
        cdef int mtu = 0
        self._check_open()
        if fd < 0:
            raise ValueError(f"not an open fd: {fd}")
        try:
            kind = _sock_int(fd, SOL_SOCKET, SO_TYPE)
            domain = _sock_int(fd, SOL_SOCKET, SO_DOMAIN)
        except OSError as exc:
            raise ValueError(f"fd {fd}: {exc.strerror}") from None
        if kind != SOCK_DGRAM:
            raise ValueError(f"fd {fd} is not a datagram socket")
        if domain != AF_INET and domain != AF_INET6:
            raise ValueError(f"fd {fd} is not an IPv4 or IPv6 socket")
        probe = socket.socket(fileno=fd)
        try:
            peer = probe.getpeername()
        except OSError as exc:
            raise ValueError(f"fd {fd} is not a connected UDP socket ({exc.strerror})") from None
        finally:
            probe.detach()
        family, packed = _pack_address(peer[0])
        ssl_ptr = rbio_ptr = wbio_ptr = 0
        if dtls is not None:
            if not isinstance(dtls, DTLSLink):
                raise ValueError("dtls must be a DTLSLink or None")
            from socks6fast.net.dtls import channel_limit  # only DTLS channels need pyOpenSSL

            limit = channel_limit(dtls.connection, dtls.mtu)
            mtu = dtls.mtu
            _load_openssl()
            ssl_ptr, rbio_ptr, wbio_ptr = _connection_pointers(dtls.connection)
        _nonblocking(fd)
        ch = <Channel*>calloc(1, sizeof(Channel))
        if ch == NULL:
            raise MemoryError()
        self._last_channel += 1
        ch.id = self._last_channel
        ch.ep.kind = EP_CHANNEL
        ch.ep.fd = fd
        ch.ep.family = domain
        ch.ep.channel = ch
        ch.ssl = <void*><uintptr_t>ssl_ptr
        ch.rbio = <void*><uintptr_t>rbio_ptr
        ch.wbio = <void*><uintptr_t>wbio_ptr
        ch.mtu = mtu
        ch.limit = limit
        ch.peer_family = family
        memcpy(ch.peer_addr, <const char*>packed, 16)
        ch.peer_port = peer[1]
        ch.owner = ch.id % self._eng.nworkers
        w = &self._eng.workers[ch.owner]
        pthread_mutex_lock(&w.lock)
        if w.stop:
            pthread_mutex_unlock(&w.lock)
            free(ch)
            raise OSError(5, "UDP worker stopped")  # EIO: the worker's epoll set failed
        # Registered before the worker can end it (drain() pops it).
        self._channels[ch.id] = (<uintptr_t>ch, dtls)
        ch.next = w.chan_inbox
        w.chan_inbox = ch
        pthread_mutex_unlock(&w.lock)
        wake_fd(w.wakefd)
        return ch.id

    def remove_channel(self, int channel) -> None:
        """End a channel now (``UdpChannelEnded`` "removed", a close_notify to a DTLS
        peer); its association lives on (D28). Unknown or ended ids are ignored."""
        cdef Channel* ch
        cdef Cmd* c
        cdef Worker* w
        cdef int owner
        entry = self._channels.get(channel)
        if self._closed or entry is None:
            return
        # The struct lives until drain() reports it ended, and it is in _channels until then.
        ch = <Channel*><uintptr_t>entry[0]
        pthread_mutex_lock(&self._eng.lock)
        ch.remove_requested = True
        owner = ch.owner
        pthread_mutex_unlock(&self._eng.lock)
        c = <Cmd*>calloc(1, sizeof(Cmd))
        if c == NULL:
            raise MemoryError()
        c.kind = CMD_REMOVE_CHANNEL
        c.channel_id = channel
        w = &self._eng.workers[owner]
        pthread_mutex_lock(&w.lock)
        c.next = w.cmds
        w.cmds = c
        pthread_mutex_unlock(&w.lock)
        wake_fd(w.wakefd)

    def drain(self) -> list:
        """Collect the events since the last call (works after :meth:`close` too)."""
        cdef Event* head
        cdef Event* ev
        cdef Assoc* a
        cdef Channel* ch
        cdef list out = []
        if self._eng == NULL:
            return out
        # Reset the eventfd before taking the list: an event queued after this read
        # writes it again, so the loop can never sleep on a non-empty list.
        if self._eng.donefd >= 0:
            clear_fd(self._eng.donefd)
        pthread_mutex_lock(&self._eng.lock)
        head = self._eng.done_head
        self._eng.done_head = NULL
        self._eng.done_tail = NULL
        self._eng.hellos = 0  # those taken now (a worker's current turn may add a few more)
        pthread_mutex_unlock(&self._eng.lock)
        try:
            ev = head
            while ev != NULL:
                aid = (<const char*>ev.aid)[:8]
                if ev.kind == EV_CONFIRMED:
                    client = None if ev.over_tcp else (_address_text(ev.family, ev.addr), ev.port)
                    out.append(UdpConfirmed(aid, bool(ev.over_tcp), client, bool(ev.server_mode),
                                            ev.channel_id))
                elif ev.kind == EV_CHANNEL_ENDED:
                    ch = ev.channel
                    out.append(UdpChannelEnded(
                        ch.id, ch.cause.decode("utf-8", "replace"), ch.datagrams_in, ch.datagrams_out,
                        ch.drops,
                    ))
                    # The DTLSLink (and its Connection) may go now: no worker uses it any more.
                    self._channels.pop(ch.id, None)
                elif ev.kind == EV_ASK:
                    out.append(UdpAsk(aid, _address_text(ev.family, ev.addr), ev.port))
                elif ev.kind == EV_CHANNEL_HELLO:
                    out.append(UdpChannelHello(ev.channel_id, (<const char*>ev.data)[:ev.data_len]))
                elif ev.kind == EV_RESOLVE:
                    name = (<const char*>ev.name)[:ev.name_len].decode("utf-8", "replace")
                    out.append(UdpResolve(aid, name, ev.port))
                else:
                    a = ev.assoc
                    out.append(UdpEnded(
                        aid, _END_MEMBERS[a.reason], a.cause.decode("utf-8", "replace"),
                        a.c2r_dgrams, a.c2r_bytes, a.r2c_dgrams, a.r2c_bytes, a.drops,
                        a.icmp_errors, a.icmp_reported,
                    ))
                    self._live.discard(aid)
                ev = ev.next
        finally:
            # Free everything even if building the list failed (MemoryError).
            while head != NULL:
                ev = head.next
                if head.assoc != NULL:
                    free_assoc(head.assoc)
                if head.channel != NULL:
                    free(head.channel.pending)
                    free(head.channel)
                free(head.data)
                free(head)
                head = ev
        return out

    def drops(self) -> dict:
        """Datagrams dropped so far, per reason, over all workers and associations."""
        cdef list totals = [0] * NDROPS
        cdef int i
        cdef int j
        if self._eng != NULL:
            for j in range(NDROPS):
                totals[j] = self._eng.final_drops[j]
            for i in range(self._eng.nworkers if self._eng.workers != NULL else 0):
                for j in range(NDROPS):
                    # Plain 64-bit reads of worker counters: a value may be a batch behind.
                    totals[j] += self._eng.workers[i].drops[j]
        return {member: totals[int(member)] for member in _DROP_MEMBERS}

    def held(self) -> tuple:
        """(datagrams, payload bytes) held now, over all associations, awaiting a verdict
        or a name (D24). A worker's figures may be a turn behind; after ``drain()`` has
        returned an association's ``UdpEnded``, nothing of it is counted any more."""
        cdef int64_t count = 0
        cdef int64_t nbytes = 0
        cdef int i
        if self._eng != NULL and self._eng.workers != NULL:
            for i in range(self._eng.nworkers):
                # Plain 64-bit reads, as drops(): the event lock orders them after an end.
                count += self._eng.workers[i].held_count
                nbytes += self._eng.workers[i].held_bytes
        return count, nbytes

    def close(self) -> None:
        """Stop the workers, end every association (``RelayEnd.SHUTDOWN``), close all fds.

        Blocks until the workers have exited (milliseconds). Idempotent. The ended
        associations remain available through :meth:`drain`.
        """
        if not self._closed:
            self._teardown()

    def __enter__(self) -> UdpEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
