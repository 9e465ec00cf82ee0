/* udpgen: the compiled UDP load generator and servers of `socks6fast bench` (the UDP rows).
 *
 * Strategy: a Python client caps near 20,000 datagrams/s on this kind of machine, so the
 * UDP traffic of the suite comes from here; the harness (socks6fast/bench/_udp.py) starts
 * these processes, reads their result lines and samples /proc. Each flow does its SOCKS
 * handshake once, blocking and bounded, then the timed loop runs without any Python:
 *
 *   none   no proxy: a UDP socket connected to the target (the reference row).
 *   s6udp  SOCKS 6 (draft-olteanu-intarea-socks-6-11, "Handling UDP ASSOCIATE"): a TCP
 *          connection carries the Request (UDP ASSOCIATE, no options), the Authentication
 *          Reply, the Operation Reply and the Association Initialization (UDP-01); the
 *          datagrams, each behind a 20-byte Datagram Header, go over plain UDP to the
 *          proxy's UDP port (by default the TCP port's number, D16); the first one fixes
 *          the mapping and brings the Association Confirmation over TCP (UDP-03, UDP-04),
 *          resent every 200 ms until it does (UDP-10).
 *   s6tcp  the same association with the datagrams framed on the TCP connection (UDP-02).
 *   s5     SOCKS 5 (RFC 1928 section 7): UDP ASSOCIATE naming the client's own UDP
 *          address, then datagrams behind the 10-byte UDP request header, to BND.ADDR:PORT.
 *
 * Loopback only: every address this program touches is 127.0.0.1 (the client's own with
 * --source: another address of 127.0.0.0/8).
 * Every loop is bounded in time (--max-seconds) and every run in count (--flows).
 *
 * Subcommands (result lines on stdout, errors on stderr):
 *   echo   --max-seconds S
 *          bind 127.0.0.1:0, print "port P", send every datagram back to its source
 *          (recvmmsg/sendmmsg, 64 at a time) until max-seconds.
 *   sink   --max-seconds S
 *          bind 127.0.0.1:0, print "port P", count datagrams (recvmmsg); each line read on
 *          stdin is answered "count DATAGRAMS BYTES NS" (totals so far, CLOCK_MONOTONIC).
 *          Ends at EOF on stdin or max-seconds.
 *   client --mode echo|pps|hold --proto none|s6udp|s6tcp|s5 --proxy PORT [--udp-port PORT]
 *          --target PORT --flows N --inflight K --size B --batch M
 *          --warmup S --seconds S --max-seconds S [--source 127.X.Y.Z]
 *          N flows, each its own association (and UDP socket). Prints "ready N" once every
 *          flow's handshake is done and confirmed end to end (echo and hold: one datagram
 *          echoed back through the proxy), or "failed FLOW REASON" and exits 1.
 *          echo: each flow keeps K datagrams of B payload bytes in flight (closed loop, a
 *            new one per reply; the send time rides in the payload); a flow silent for
 *            200 ms refills its window and its missing datagrams count as lost. Prints
 *            "start" when the window opens (after warmup), then
 *            "done ECHOES ELAPSED_NS LOST P50_NS P99_NS SENT" (round trips of the window).
 *          pps: one way, open loop: each flow sends batches of M datagrams (sendmmsg; over
 *            TCP, M frames per write) to the target (a sink) as fast as it can. Prints
 *            "start", then "done SENT ELAPSED_NS"; the sink counts what arrived.
 *          hold: print "ready N" and keep every association open and idle until stdin
 *            closes or max-seconds (memory per idle association).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXFLOWS 4096
#define MAXLAT 4000000
#define MAXBATCH 256
#define MAXSIZE 60000
#define TCPBUF (1 << 18)

enum proto { P_NONE, P_S6UDP, P_S6TCP, P_S5 };
enum mode { M_ECHO, M_PPS, M_HOLD };

static int opt_proxy = 0, opt_udp_port = 0, opt_target = 0, opt_flows = 4, opt_inflight = 4;
static int opt_size = 64, opt_batch = 32;
static double opt_warmup = 0.3, opt_seconds = 1.0, opt_max_seconds = 30.0;
static enum proto opt_proto = P_NONE;
static enum mode opt_mode = M_ECHO;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sa;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* The client's own address (--source): 127.0.0.1 unless the harness spreads runs over
 * 127.0.0.0/8, e.g. to hold more associations than a proxy allows per client address. */
static struct in_addr opt_source = {.s_addr = 0};

static int udp_bound(void) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = loopback(0);
    if (opt_source.s_addr) sa.sin_addr = opt_source;
    int big = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("udpgen: bind");
        exit(2);
    }
    return fd;
}

static int local_port(int fd) {
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &len);
    return ntohs(sa.sin_port);
}

/* ---------------------------------------------------------------- servers */

static int cmd_echo(void) {
    int fd = udp_bound();
    printf("port %d\n", local_port(fd));
    fflush(stdout);
    enum { B = 64 };
    static char bufs[B][65536];
    struct mmsghdr msgs[B];
    struct iovec iov[B];
    struct sockaddr_in peers[B];
    uint64_t end = now_ns() + (uint64_t)(opt_max_seconds * 1e9);
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    while (now_ns() < end) {
        if (poll(&pfd, 1, 100) <= 0) continue;
        for (int i = 0; i < B; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = sizeof bufs[i];
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &peers[i];
            msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
        }
        int n = recvmmsg(fd, msgs, B, MSG_DONTWAIT, NULL);
        if (n <= 0) continue;
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        int off = 0;
        while (off < n) {
            int r = sendmmsg(fd, msgs + off, (unsigned)(n - off), 0);
            if (r <= 0) break;
            off += r;
        }
    }
    return 0;
}

static int cmd_sink(void) {
    int fd = udp_bound();
    printf("port %d\n", local_port(fd));
    fflush(stdout);
    enum { B = 64 };
    static char bufs[B][2048];
    struct mmsghdr msgs[B];
    struct iovec iov[B];
    for (int i = 0; i < B; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    uint64_t count = 0, bytes = 0, end = now_ns() + (uint64_t)(opt_max_seconds * 1e9);
    struct pollfd pfd[2] = {{.fd = fd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    while (now_ns() < end) {
        if (poll(pfd, 2, 100) <= 0) continue;
        if (pfd[1].revents) {
            char b[256];
            if (read(0, b, sizeof b) <= 0) break; /* the harness closed stdin: stop */
            /* Drain what is queued first, so the count is as of now. */
            int n;
            while ((n = recvmmsg(fd, msgs, B, MSG_DONTWAIT, NULL)) > 0) {
                count += (uint64_t)n;
                for (int i = 0; i < n; i++) bytes += msgs[i].msg_len;
            }
            printf("count %llu %llu %llu\n", (unsigned long long)count, (unsigned long long)bytes,
                   (unsigned long long)now_ns());
            fflush(stdout);
        }
        if (pfd[0].revents) {
            int n = recvmmsg(fd, msgs, B, MSG_DONTWAIT, NULL);
            if (n > 0) {
                count += (uint64_t)n;
                for (int i = 0; i < n; i++) bytes += msgs[i].msg_len;
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- client */

struct flow {
    int udp;           /* the datagram socket (none, s6udp, s5), -1 for s6tcp */
    int tcp;           /* the SOCKS control connection (s6udp, s6tcp, s5), -1 for none */
    int data;          /* where datagrams go: udp, or tcp for s6tcp */
    unsigned char aid[8];
    int inflight;
    uint64_t last_rx;
    int inlen;         /* s6tcp: bytes buffered from the TCP stream */
    int out_off;       /* s6tcp pps: bytes of the current batch already written */
    unsigned char *in; /* s6tcp: TCPBUF bytes */
};

static struct flow flows[MAXFLOWS];
static int hlen; /* the client's header length in front of each payload */

static int fail(int flow, const char *why) {
    printf("failed %d %s%s%s\n", flow, why, errno ? ": " : "", errno ? strerror(errno) : "");
    fflush(stdout);
    return -1;
}

/* Blocking read of exactly n bytes (SO_RCVTIMEO bounds it). */
static int read_n(int fd, unsigned char *p, int n) {
    int got = 0;
    while (got < n) {
        ssize_t r = read(fd, p + got, (size_t)(n - got));
        if (r <= 0) {
            if (r == 0) errno = ECONNRESET;
            return -1;
        }
        got += (int)r;
    }
    return 0;
}

static int write_all(int fd, const unsigned char *p, int n) {
    /* Handshake messages are tiny; on a fresh loopback connection one write takes them. */
    return write(fd, p, (size_t)n) == (ssize_t)n ? 0 : -1;
}

static int addr_len(unsigned char atyp) { return atyp == 1 ? 4 : atyp == 4 ? 16 : -1; }

/* The header in front of each payload, written into msg (the Association ID goes in per flow). */
static void write_header(unsigned char *msg, int total) {
    if (opt_proto == P_S6UDP || opt_proto == P_S6TCP) {
        /* Datagram Header (section "Handling UDP ASSOCIATE"): 06 03 LEN AID(8) ATYP=1 00 PORT
         * 127.0.0.1; Message Length is the whole message, header included. */
        msg[0] = 6;
        msg[1] = 3;
        msg[2] = (unsigned char)(total >> 8);
        msg[3] = (unsigned char)(total & 0xff);
        msg[12] = 1;
        msg[13] = 0;
        msg[14] = (unsigned char)(opt_target >> 8);
        msg[15] = (unsigned char)(opt_target & 0xff);
        msg[16] = 127;
        msg[17] = 0;
        msg[18] = 0;
        msg[19] = 1;
    } else if (opt_proto == P_S5) {
        /* RFC 1928 section 7: RSV(2) FRAG=0 ATYP=1 DST.ADDR DST.PORT. */
        msg[0] = msg[1] = msg[2] = 0;
        msg[3] = 1;
        msg[4] = 127;
        msg[5] = 0;
        msg[6] = 0;
        msg[7] = 1;
        msg[8] = (unsigned char)(opt_target >> 8);
        msg[9] = (unsigned char)(opt_target & 0xff);
    }
}

/* Payload offset of a datagram received on a UDP socket, or -1 to ignore it. */
static int udp_payload_offset(const unsigned char *p, int n) {
    if (opt_proto == P_NONE) return 0;
    if (opt_proto == P_S5) {
        if (n < 4 || p[2] != 0) return -1;
        int al = addr_len(p[3]);
        return al < 0 || n < 4 + al + 2 ? -1 : 4 + al + 2;
    }
    /* SOCKS 6: 06 03 LEN AID ATYP 00 PORT ADDR; Message Length may be below n (padding, UDP-05). */
    if (n < 16 || p[0] != 6 || p[1] != 3) return -1;
    int al = addr_len(p[12]), len = (p[2] << 8) | p[3];
    if (al < 0 || len > n || len < 16 + al) return -1;
    return 16 + al;
}

/* s6tcp: take one complete message off the flow's TCP buffer. Returns its length (0: none yet,
 * -1: malformed); *type gets the Message Type and *payload the payload length of a Datagram. */
static int tcp_message(struct flow *f, int *type, int *payload) {
    if (f->inlen < 4) return 0;
    const unsigned char *p = f->in;
    int len = (p[2] << 8) | p[3];
    if (p[0] != 6 || len < 12) return -1;
    if (f->inlen < len) return 0;
    *type = p[1];
    *payload = 0;
    if (p[1] == 3) {
        int al = len >= 16 ? addr_len(p[12]) : -1;
        if (al < 0 || len < 16 + al) return -1;
        *payload = len - 16 - al;
    }
    return len;
}

static void tcp_consume(struct flow *f, int n) {
    memmove(f->in, f->in + n, (size_t)(f->inlen - n));
    f->inlen -= n;
}

/* Send one datagram (the probe of the handshake). */
static int send_probe(struct flow *f, unsigned char *msg) {
    uint64_t t = now_ns();
    if (opt_proto == P_S6UDP || opt_proto == P_S6TCP) memcpy(msg + 4, f->aid, 8);
    memcpy(msg + hlen, &t, 8);
    return write_all(f->data, msg, hlen + opt_size);
}

/* Wait up to `ms` for one echoed datagram on the flow (any header accepted); 0 when one came. */
static int wait_echo(struct flow *f, int ms) {
    unsigned char rx[65536];
    struct pollfd pfd = {.fd = f->data, .events = POLLIN};
    uint64_t end = now_ns() + (uint64_t)ms * 1000000ull;
    while (now_ns() < end) {
        if (poll(&pfd, 1, 20) <= 0) continue;
        if (opt_proto == P_S6TCP) {
            ssize_t r = read(f->tcp, f->in + f->inlen, (size_t)(TCPBUF - f->inlen));
            if (r <= 0) return -1;
            f->inlen += (int)r;
            int type, payload, len;
            while ((len = tcp_message(f, &type, &payload)) > 0) {
                tcp_consume(f, len);
                if (type == 3 && payload == opt_size) return 0;
            }
            if (len < 0) return -1;
        } else {
            ssize_t r = recv(f->udp, rx, sizeof rx, MSG_DONTWAIT);
            if (r > 0 && udp_payload_offset(rx, (int)r) >= 0) return 0;
        }
    }
    errno = ETIMEDOUT;
    return -1;
}

/* The SOCKS 6 Request for UDP ASSOCIATE, then the replies up to the Association Initialization. */
static int socks6_associate(int i, struct flow *f) {
    /* Section "Requests": Version 6, Command 0x03 UDP ASSOCIATE, Options Length 0, Port 0,
     * Padding 0, Address Type IPv4, 0.0.0.0 (any bind address and port). */
    static const unsigned char req[12] = {6, 3, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0};
    unsigned char b[1024];
    if (write_all(f->tcp, req, sizeof req) < 0) return fail(i, "request");
    /* Authentication Reply: Version, Type (0 success), Options Length, options. */
    if (read_n(f->tcp, b, 4) < 0) return fail(i, "no authentication reply");
    if (b[0] != 6 || b[1] != 0) {
        errno = 0;
        return fail(i, "authentication failed");
    }
    int optlen = (b[2] << 8) | b[3];
    if (optlen > (int)sizeof b || read_n(f->tcp, b, optlen) < 0) return fail(i, "authentication reply");
    /* Operation Reply: Version, Reply Code, Options Length, Bind Port, Padding, ATYP, Address. */
    if (read_n(f->tcp, b, 8) < 0) return fail(i, "no operation reply");
    if (b[0] != 6 || b[1] != 0) {
        char why[64];
        snprintf(why, sizeof why, "operation reply code %d", b[1]);
        errno = 0;
        return fail(i, why);
    }
    optlen = (b[2] << 8) | b[3];
    int al = addr_len(b[7]);
    if (al < 0 || al + optlen > (int)sizeof b || read_n(f->tcp, b, al + optlen) < 0)
        return fail(i, "operation reply");
    /* Association Initialization (UDP-01): 06 01 00 0c and the 8-byte Association ID. */
    if (read_n(f->tcp, b, 12) < 0) return fail(i, "no association initialization");
    if (b[0] != 6 || b[1] != 1 || b[2] != 0 || b[3] != 12) {
        errno = 0;
        return fail(i, "bad association initialization");
    }
    memcpy(f->aid, b + 4, 8);
    return 0;
}

/* Read the 12-byte Association Confirmation off the TCP connection (UDP-04); with plain UDP,
 * resend the first datagram every 200 ms until it comes (UDP-10). */
static int socks6_confirm(int i, struct flow *f, unsigned char *msg) {
    unsigned char b[12];
    int got = 0;
    uint64_t end = now_ns() + 5000000000ull;
    struct pollfd pfd = {.fd = f->tcp, .events = POLLIN};
    while (got < 12) {
        if (now_ns() > end) {
            errno = ETIMEDOUT;
            return fail(i, "no association confirmation");
        }
        if (poll(&pfd, 1, 200) <= 0) {
            if (opt_proto == P_S6UDP && send_probe(f, msg) < 0) return fail(i, "send");
            continue;
        }
        ssize_t r = read(f->tcp, b + got, (size_t)(12 - got));
        if (r <= 0) {
            if (r == 0) errno = ECONNRESET;
            return fail(i, "association confirmation");
        }
        got += (int)r;
    }
    if (b[0] != 6 || b[1] != 2 || memcmp(b + 4, f->aid, 8) != 0) {
        errno = 0;
        return fail(i, "bad association confirmation");
    }
    return 0;
}

/* RFC 1928: greeting (no authentication), UDP ASSOCIATE naming the address the client will send
 * from (the client's own UDP socket), the reply's BND.ADDR:BND.PORT is where datagrams go. */
static int socks5_associate(int i, struct flow *f) {
    unsigned char b[512];
    static const unsigned char greet[3] = {5, 1, 0};
    if (write_all(f->tcp, greet, 3) < 0 || read_n(f->tcp, b, 2) < 0) return fail(i, "greeting");
    if (b[0] != 5 || b[1] != 0) {
        errno = 0;
        return fail(i, "method refused");
    }
    int port = local_port(f->udp);
    unsigned char req[10] = {5, 3, 0, 1, 127, 0, 0, 1, (unsigned char)(port >> 8), (unsigned char)port};
    if (opt_source.s_addr) memcpy(req + 4, &opt_source.s_addr, 4);
    if (write_all(f->tcp, req, sizeof req) < 0 || read_n(f->tcp, b, 4) < 0) return fail(i, "no reply");
    if (b[0] != 5 || b[1] != 0) {
        char why[64];
        snprintf(why, sizeof why, "reply code %d", b[1]);
        errno = 0;
        return fail(i, why);
    }
    if (b[3] != 1) {
        errno = 0;
        return fail(i, "BND.ADDR is not IPv4");
    }
    if (read_n(f->tcp, b, 6) < 0) return fail(i, "reply address");
    struct sockaddr_in relay = loopback((b[4] << 8) | b[5]);
    uint32_t addr;
    memcpy(&addr, b, 4);
    if (addr != 0) relay.sin_addr.s_addr = addr; /* 0.0.0.0: the address the TCP connection went to */
    if (connect(f->udp, (struct sockaddr *)&relay, sizeof relay) < 0) return fail(i, "connect relay");
    return 0;
}

static int setup_flow(int i, unsigned char *msg) {
    struct flow *f = &flows[i];
    f->udp = f->tcp = -1;
    errno = 0;
    if (opt_proto != P_S6TCP) f->udp = udp_bound();
    if (opt_proto != P_NONE) {
        f->tcp = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(f->tcp, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct timeval tv = {.tv_sec = 5};
        setsockopt(f->tcp, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        struct sockaddr_in sa = loopback(opt_proxy);
        if (opt_source.s_addr) {
            struct sockaddr_in src = loopback(0);
            src.sin_addr = opt_source;
            if (bind(f->tcp, (struct sockaddr *)&src, sizeof src) < 0) return fail(i, "bind --source");
        }
        if (connect(f->tcp, (struct sockaddr *)&sa, sizeof sa) < 0) return fail(i, "connect to the proxy");
    }
    f->data = opt_proto == P_S6TCP ? f->tcp : f->udp;
    if (opt_proto == P_S6TCP) f->in = malloc(TCPBUF);
    int rc = 0;
    if (opt_proto == P_NONE) {
        struct sockaddr_in sa = loopback(opt_target);
        if (connect(f->udp, (struct sockaddr *)&sa, sizeof sa) < 0) return fail(i, "connect");
    } else if (opt_proto == P_S5) {
        rc = socks5_associate(i, f);
    } else {
        rc = socks6_associate(i, f);
        if (rc == 0 && opt_proto == P_S6UDP) {
            struct sockaddr_in sa = loopback(opt_udp_port);
            if (connect(f->udp, (struct sockaddr *)&sa, sizeof sa) < 0) return fail(i, "connect udp port");
        }
        if (rc == 0 && send_probe(f, msg) < 0) return fail(i, "first datagram");
        if (rc == 0) rc = socks6_confirm(i, f, msg);
    }
    if (rc < 0) return rc;
    if (opt_mode == M_PPS) return 0; /* the target is a sink: nothing comes back */
    /* Prove the path end to end: one datagram echoed back (resent a few times: UDP may drop). */
    for (int attempt = 0; attempt < 5; attempt++) {
        if (!(attempt == 0 && opt_proto >= P_S6UDP && opt_proto <= P_S6TCP) && send_probe(f, msg) < 0)
            return fail(i, "send");
        if (wait_echo(f, 400) == 0) break;
        if (attempt == 4) return fail(i, "no datagram came back through the proxy");
    }
    /* Drop any further echo of the resent probes before the measured loop starts. */
    struct pollfd pfd = {.fd = f->data, .events = POLLIN};
    while (opt_proto != P_S6TCP && poll(&pfd, 1, 20) > 0) {
        unsigned char rx[65536];
        if (recv(f->udp, rx, sizeof rx, MSG_DONTWAIT) < 0) break;
    }
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int run_echo(unsigned char *msg, uint64_t hard) {
    static uint64_t lat[MAXLAT];
    size_t nlat = 0;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < opt_flows; i++) {
        set_nonblock(flows[i].data);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, flows[i].data, &ev);
    }
    int total = hlen + opt_size;
    uint64_t t0 = now_ns();
    uint64_t start = t0 + (uint64_t)(opt_warmup * 1e9);
    uint64_t stop = start + (uint64_t)(opt_seconds * 1e9);
    uint64_t echoes = 0, lost = 0, sent = 0;
    int started = 0;
    for (int i = 0; i < opt_flows; i++) flows[i].last_rx = t0;
    struct epoll_event evs[256];
    static unsigned char rx[65536];
    for (;;) {
        uint64_t t = now_ns();
        if (t >= hard || t >= stop) break;
        if (!started && t >= start) {
            started = 1;
            echoes = lost = sent = 0;
            nlat = 0;
            printf("start\n");
            fflush(stdout);
        }
        for (int i = 0; i < opt_flows; i++) {
            struct flow *f = &flows[i];
            if (f->inflight > 0 && t - f->last_rx > 200000000ull) {
                lost += (uint64_t)f->inflight;
                f->inflight = 0;
            }
            while (f->inflight < opt_inflight) {
                if (opt_proto == P_S6UDP || opt_proto == P_S6TCP) memcpy(msg + 4, f->aid, 8);
                memcpy(msg + hlen, &t, 8); /* the send time rides in the payload */
                if (send(f->data, msg, (size_t)total, MSG_NOSIGNAL) != total) break;
                f->inflight++;
                sent++;
                f->last_rx = t;
            }
        }
        int n = epoll_wait(ep, evs, 256, 50);
        for (int k = 0; k < n; k++) {
            struct flow *f = &flows[evs[k].data.u32];
            for (;;) {
                int off = 0, plen = 0;
                const unsigned char *payload;
                if (opt_proto == P_S6TCP) {
                    int type, len = tcp_message(f, &type, &plen);
                    if (len < 0) {
                        fprintf(stderr, "udpgen: malformed message on the TCP connection\n");
                        printf("failed %d malformed message\n", (int)(f - flows));
                        return 1;
                    }
                    if (len == 0) {
                        ssize_t r = read(f->tcp, f->in + f->inlen, (size_t)(TCPBUF - f->inlen));
                        if (r <= 0) break;
                        f->inlen += (int)r;
                        continue;
                    }
                    payload = f->in + len - plen;
                    if (type != 3 || plen != opt_size) {
                        tcp_consume(f, len);
                        continue;
                    }
                    off = len; /* consumed after the payload is read */
                } else {
                    ssize_t r = recv(f->udp, rx, sizeof rx, 0);
                    if (r < 0) break;
                    int o = udp_payload_offset(rx, (int)r);
                    if (o < 0 || (int)r - o < opt_size) continue;
                    payload = rx + o;
                }
                uint64_t sent_at, t2 = now_ns();
                memcpy(&sent_at, payload, 8);
                if (off) tcp_consume(f, off);
                if (f->inflight > 0) f->inflight--;
                f->last_rx = t2;
                echoes++;
                if (started && nlat < MAXLAT) lat[nlat++] = t2 - sent_at;
                if (opt_proto == P_S6UDP || opt_proto == P_S6TCP) memcpy(msg + 4, f->aid, 8);
                memcpy(msg + hlen, &t2, 8);
                if (send(f->data, msg, (size_t)total, MSG_NOSIGNAL) == total) {
                    f->inflight++;
                    sent++;
                }
            }
        }
    }
    uint64_t elapsed = now_ns() - start;
    qsort(lat, nlat, sizeof lat[0], cmp_u64);
    uint64_t p50 = nlat ? lat[nlat / 2] : 0, p99 = nlat ? lat[nlat * 99 / 100] : 0;
    printf("done %llu %llu %llu %llu %llu %llu\n", (unsigned long long)echoes, (unsigned long long)elapsed,
           (unsigned long long)lost, (unsigned long long)p50, (unsigned long long)p99,
           (unsigned long long)sent);
    fflush(stdout);
    return 0;
}

static int run_pps(unsigned char *msg, uint64_t hard) {
    int total = hlen + opt_size, batch = opt_batch;
    /* One prebuilt batch per flow: M copies of the message (the Association ID differs per flow). */
    struct mmsghdr *mm = calloc((size_t)batch, sizeof *mm);
    struct iovec *iov = calloc((size_t)batch, sizeof *iov);
    unsigned char **bufs = calloc((size_t)opt_flows, sizeof *bufs);
    for (int i = 0; i < opt_flows; i++) {
        bufs[i] = malloc((size_t)total * (size_t)batch);
        if (opt_proto == P_S6UDP || opt_proto == P_S6TCP) memcpy(msg + 4, flows[i].aid, 8);
        for (int k = 0; k < batch; k++) memcpy(bufs[i] + (size_t)k * (size_t)total, msg, (size_t)total);
        set_nonblock(flows[i].data);
    }
    uint64_t t0 = now_ns();
    uint64_t start = t0 + (uint64_t)(opt_warmup * 1e9);
    uint64_t stop = start + (uint64_t)(opt_seconds * 1e9);
    uint64_t sent = 0;
    int started = 0;
    struct pollfd *pfd = calloc((size_t)opt_flows, sizeof *pfd);
    for (;;) {
        uint64_t t = now_ns();
        if (t >= hard || t >= stop) break;
        if (!started && t >= start) {
            started = 1;
            sent = 0;
            printf("start\n");
            fflush(stdout);
        }
        int progress = 0;
        for (int i = 0; i < opt_flows; i++) {
            struct flow *f = &flows[i];
            if (opt_proto == P_S6TCP) {
                /* M frames per write; a partial write continues where it stopped. */
                size_t len = (size_t)total * (size_t)batch;
                ssize_t w = write(f->tcp, bufs[i] + f->out_off, len - (size_t)f->out_off);
                if (w > 0) {
                    int before = f->out_off / total;
                    f->out_off += (int)w;
                    sent += (uint64_t)(f->out_off / total - before);
                    if ((size_t)f->out_off == len) f->out_off = 0;
                    progress = 1;
                } else if (w < 0 && errno != EAGAIN) {
                    printf("failed %d write: %s\n", i, strerror(errno));
                    return 1;
                }
                continue;
            }
            for (int k = 0; k < batch; k++) {
                iov[k].iov_base = bufs[i] + (size_t)k * (size_t)total;
                iov[k].iov_len = (size_t)total;
                memset(&mm[k].msg_hdr, 0, sizeof mm[k].msg_hdr);
                mm[k].msg_hdr.msg_iov = &iov[k];
                mm[k].msg_hdr.msg_iovlen = 1;
            }
            int r = sendmmsg(f->udp, mm, (unsigned)batch, 0);
            if (r > 0) {
                sent += (uint64_t)r;
                progress = 1;
            }
        }
        if (!progress) {
            /* Every socket is full: wait until one has room (bounded, 10 ms). */
            for (int i = 0; i < opt_flows; i++) pfd[i] = (struct pollfd){.fd = flows[i].data, .events = POLLOUT};
            poll(pfd, (nfds_t)opt_flows, 10);
        }
    }
    printf("done %llu %llu\n", (unsigned long long)sent, (unsigned long long)(now_ns() - start));
    fflush(stdout);
    return 0;
}

static int run_hold(uint64_t hard) {
    /* Keep every association idle until the harness closes our stdin (or the deadline). */
    for (;;) {
        uint64_t t = now_ns();
        if (t >= hard) break;
        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        if (poll(&pfd, 1, (int)((hard - t) / 1000000ull) + 1) > 0) {
            char b[64];
            if (read(0, b, sizeof b) <= 0) break;
        }
    }
    return 0;
}

static int cmd_client(void) {
    if (opt_flows < 1 || opt_flows > MAXFLOWS || opt_inflight < 1 || opt_size < 8 || opt_size > MAXSIZE ||
        opt_batch < 1 || opt_batch > MAXBATCH) {
        fprintf(stderr, "udpgen: bad arguments\n");
        return 2;
    }
    if (opt_udp_port == 0) opt_udp_port = opt_proxy; /* D16: UDP on the TCP listener's port number */
    hlen = opt_proto == P_S6UDP || opt_proto == P_S6TCP ? 20 : opt_proto == P_S5 ? 10 : 0;
    static unsigned char msg[MAXSIZE + 64];
    memset(msg, 'e', sizeof msg);
    write_header(msg, hlen + opt_size);
    uint64_t hard = now_ns() + (uint64_t)(opt_max_seconds * 1e9);
    for (int i = 0; i < opt_flows; i++) {
        if (now_ns() > hard) {
            printf("failed %d out of time\n", i);
            return 1;
        }
        if (setup_flow(i, msg) < 0) return 1;
    }
    printf("ready %d\n", opt_flows);
    fflush(stdout);
    if (opt_mode == M_HOLD) return run_hold(hard);
    if (opt_mode == M_PPS) return run_pps(msg, hard);
    return run_echo(msg, hard);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: udpgen echo|sink|client [options]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--proxy")) opt_proxy = atoi(v);
        else if (!strcmp(k, "--udp-port")) opt_udp_port = atoi(v);
        else if (!strcmp(k, "--target")) opt_target = atoi(v);
        else if (!strcmp(k, "--flows")) opt_flows = atoi(v);
        else if (!strcmp(k, "--inflight")) opt_inflight = atoi(v);
        else if (!strcmp(k, "--size")) opt_size = atoi(v);
        else if (!strcmp(k, "--batch")) opt_batch = atoi(v);
        else if (!strcmp(k, "--warmup")) opt_warmup = atof(v);
        else if (!strcmp(k, "--seconds")) opt_seconds = atof(v);
        else if (!strcmp(k, "--max-seconds")) opt_max_seconds = atof(v);
        else if (!strcmp(k, "--source")) {
            /* Loopback only: anything outside 127.0.0.0/8 is refused. */
            if (inet_pton(AF_INET, v, &opt_source) != 1 || (ntohl(opt_source.s_addr) >> 24) != 127) {
                fprintf(stderr, "udpgen: --source must be an address in 127.0.0.0/8\n");
                return 2;
            }
        }
        else if (!strcmp(k, "--mode")) {
            opt_mode = !strcmp(v, "pps") ? M_PPS : !strcmp(v, "hold") ? M_HOLD : M_ECHO;
        } else if (!strcmp(k, "--proto")) {
            opt_proto = !strcmp(v, "s6udp") ? P_S6UDP : !strcmp(v, "s6tcp") ? P_S6TCP
                      : !strcmp(v, "s5")    ? P_S5    : P_NONE;
        } else {
            fprintf(stderr, "udpgen: unknown option %s\n", k);
            return 2;
        }
    }
    if (!strcmp(argv[1], "echo")) return cmd_echo();
    if (!strcmp(argv[1], "sink")) return cmd_sink();
    if (!strcmp(argv[1], "client")) return cmd_client();
    fprintf(stderr, "udpgen: unknown command %s\n", argv[1]);
    return 2;
}
