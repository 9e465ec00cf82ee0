/* loadgen: the compiled load generator and servers of `socks6fast bench`.
 *
 * Strategy: a plain Python client tops out near 5,000 connections/s on this
 * kind of machine, so everything that moves bytes or opens connections at rate
 * lives here; the Python harness (socks6fast/bench/suite.py) only starts these
 * processes, reads one line of results from each, and samples /proc. It speaks
 * the client half of three protocols, no authentication: none (direct),
 * SOCKS5 (RFC 1928 CONNECT) and SOCKS6 (draft-olteanu-intarea-socks-6-11
 * CONNECT; the 64-byte request payload rides right behind the Request as a
 * false start, conformance item CMD-03).
 *
 * Loopback only: every address this program touches is 127.0.0.1.
 * Every loop is bounded in time (--max-seconds) and in count.
 *
 * Subcommands (each prints result lines on stdout, errors on stderr):
 *   sink     --port P --conns N --warmup S --seconds S --max-seconds S
 *            accept N streams, discard their bytes with splice(2) into
 *            /dev/null; once all N are flowing wait `warmup`, print "start",
 *            count bytes for `seconds`, print "done BYTES NANOSECONDS", exit.
 *   rrserver --port P --max-seconds S [--stats 1]
 *            per connection: read 64 bytes, write 64 bytes, close (the server
 *            closes first so TIME_WAIT lands on this side, see benchmarks/README.md, Peers).
 *            With --stats 1, each line read on stdin is answered with
 *            "stats ACCEPTED" (connections accepted so far).
 *   echo     --port P --max-seconds S    echo every byte back; never closes first.
 *   bulk     --proxy PORT|0 --proto none|5|6 --target PORT --streams N --max-seconds S
 *            open N streams, print "connected", then sendfile(2) from a memfd
 *            until the sink closes or max-seconds; print "sent BYTES".
 *   rr       ... --concurrency C --count K --max-seconds S [--sources N]
 *            K connections, C at a time (from N loopback source addresses in turn,
 *            127.0.0.1 .. 127.0.0.N; default 1): handshake, 64 bytes out, 64 bytes back,
 *            wait for the server's close. Prints
 *            "rr OK FAILED CUT_OFF ELAPSED_NS P50_NS P99_NS MEAN_NS" (CUT_OFF: still
 *            open when max-seconds ended the run).
 *   hold     ... --conns N --max-seconds S
 *            open N connections, confirm each with a 1-byte echo through the
 *            proxy, print "ready N", hold them until stdin closes or max-seconds.
 *   splicerelay --port P --target PORT --max-seconds S
 *            the floor of a user-space relay, for `socks6fast bench ceiling`:
 *            no SOCKS, one connection at a time, client -> target only, with
 *            blocking splice(2) through one 1 MiB pipe (no epoll, no second
 *            direction, no bookkeeping). Prints "port P" once listening.
 *   shim     --port P --target PORT --delay-us D --handshake 0|1 --max-seconds S [--stats 1]
 *            forward to 127.0.0.1:PORT adding D microseconds one way in each
 *            direction; the listener accepts TCP Fast Open (see cmd_shim). With
 *            --stats 1, each line read on stdin is answered with
 *            "stats ACCEPTED SYN_DATA SYN_BYTES UP_TFO UP_SYN_ACKED": connections,
 *            those whose SYN carried data the kernel accepted, the bytes of those
 *            SYNs, upstream connections opened with TFO, and of those the ones whose
 *            SYN data the upstream (the proxy) accepted.
 * Servers given --port 0 bind an ephemeral port and print "port P" first.
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
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

/* Older libc headers may lack these (include/uapi/linux/tcp.h). */
#ifndef TCP_FASTOPEN
#define TCP_FASTOPEN 23
#endif
#ifndef TCP_SAVE_SYN
#define TCP_SAVE_SYN 27
#endif
#ifndef TCP_SAVED_SYN
#define TCP_SAVED_SYN 28
#endif
#ifndef TCP_FASTOPEN_CONNECT
#define TCP_FASTOPEN_CONNECT 30
#endif
#ifndef TCPI_OPT_SYN_DATA
#define TCPI_OPT_SYN_DATA 32
#endif

#define PAYLOAD_LEN 64
#define INBUF_LEN 1024
#define MAX_EVENTS 256

enum proto { P_NONE, P_SOCKS5, P_SOCKS6 };
enum mode { M_BULK, M_RR, M_HOLD };
enum state { S_CONNECTING, S5_METHOD, S5_REPLY, S6_AUTH, S6_OP, S_DATA, S_EOF, S_ESTABLISHED, S_DONE, S_FAILED };

static int opt_port = 0, opt_proxy = 0, opt_target = 0, opt_streams = 1, opt_conns = 1;
static int opt_concurrency = 1, opt_count = 1;
static double opt_warmup = 0.3, opt_seconds = 1.0, opt_max_seconds = 30.0;
static int opt_splice = 1, opt_handshake = 1, opt_stats = 0;
/* rr --sources N: connections come from 127.0.0.1 .. 127.0.0.N in turn (serve --workers
 * steers by client address, issue 13: one address would reach one worker only). */
static int opt_sources = 1;
static unsigned rr_source;
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
static int listen_tfo = 0; /* listen_on: accept TCP Fast Open and keep each SYN's headers */
static double opt_delay_us = 20000;
static enum proto opt_proto = P_NONE;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void raise_nofile(void) {
    /* 1,000 idle connections need more descriptors than a default soft limit of 1024. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sa;
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = loopback(port);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen_tfo) {
        /* RFC 7413 server side (needs net.ipv4.tcp_fastopen bit 2), and the SYN's IP and TCP
         * headers kept for getsockopt(TCP_SAVED_SYN), to learn how many bytes it carried. */
        int qlen = 256;
        if (setsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN, &qlen, sizeof qlen) < 0) die("TCP_FASTOPEN");
        if (setsockopt(fd, IPPROTO_TCP, TCP_SAVE_SYN, &one, sizeof one) < 0) die("TCP_SAVE_SYN");
    }
    if (listen(fd, 4096) < 0) die("listen");
    socklen_t len = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &len);
    if (port == 0) {
        printf("port %d\n", ntohs(sa.sin_port));
        fflush(stdout);
    }
    set_nonblock(fd);
    return fd;
}

/* With --stats 1: watch stdin; every line read there is answered by report(). */
static void stats_watch(int ep) {
    if (!opt_stats) return;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = 0};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
}

/* Returns 1 if fd was stdin (handled), 0 otherwise. */
static int stats_event(int ep, int fd, void (*report)(void)) {
    if (!opt_stats || fd != 0) return 0;
    char b[256];
    ssize_t r = read(0, b, sizeof b);
    if (r <= 0) epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL); /* the harness closed it: stop watching */
    else report();
    return 1;
}

/* ---------------------------------------------------------------- servers */

static int cmd_sink(void) {
    int lfd = listen_on(opt_port);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC | O_NONBLOCK) < 0) die("pipe2");
    fcntl(pfd[1], F_SETPIPE_SZ, 1 << 20);
    char *buf = malloc(1 << 18); /* read(2) fallback when splice(2) is refused */
    int use_splice = opt_splice, accepted = 0;
    uint64_t total = 0, at_start = 0;
    double t_begin = now_s(), t_flow = 0, t_start = 0;
    int64_t ns_start = 0;
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        double t = now_s();
        if (t - t_begin > opt_max_seconds) {
            fprintf(stderr, "loadgen sink: timeout (accepted %d of %d, %llu bytes)\n", accepted, opt_conns,
                    (unsigned long long)total);
            printf("timeout\n");
            return 1;
        }
        if (t_flow == 0 && accepted >= opt_conns && total > 0) t_flow = t;
        if (t_flow != 0 && t_start == 0 && t - t_flow >= opt_warmup) {
            t_start = t;
            ns_start = now_ns();
            at_start = total;
            printf("start\n");
            fflush(stdout);
        }
        if (t_start != 0 && t - t_start >= opt_seconds) {
            printf("done %llu %lld\n", (unsigned long long)(total - at_start), (long long)(now_ns() - ns_start));
            fflush(stdout);
            return 0;
        }
        int n = epoll_wait(ep, evs, MAX_EVENTS, 5);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                    accepted++;
                }
                continue;
            }
            /* At most a few MiB per event so one stream cannot starve the others. */
            for (int round = 0; round < 4; round++) {
                ssize_t got;
                if (use_splice) {
                    got = splice(fd, NULL, pfd[1], NULL, 1 << 20, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
                    if (got < 0 && errno == EINVAL) {
                        use_splice = 0;
                        continue;
                    }
                    if (got > 0) {
                        /* Drain the pipe into /dev/null: the bytes are never copied to user space. */
                        ssize_t left = got;
                        while (left > 0) {
                            ssize_t w = splice(pfd[0], NULL, devnull, NULL, (size_t)left, SPLICE_F_MOVE);
                            if (w <= 0) die("splice to /dev/null");
                            left -= w;
                        }
                    }
                } else {
                    got = read(fd, buf, 1 << 18);
                }
                if (got > 0) {
                    total += (uint64_t)got;
                    continue;
                }
                if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                    close(fd);
                }
                break;
            }
        }
    }
}

struct srvconn {
    int got;
};

static long long server_accepted;

static void server_report(void) {
    printf("stats %lld\n", server_accepted);
    fflush(stdout);
}

static int cmd_server(int echo) {
    int lfd = listen_on(opt_port);
    printf("listening\n");
    fflush(stdout);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    stats_watch(ep);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    size_t maxfd = rl.rlim_cur > 1048576 ? 1048576 : rl.rlim_cur;
    int *got = calloc(maxfd, sizeof(int)); /* bytes received so far, indexed by fd */
    char buf[4096], resp[PAYLOAD_LEN];
    memset(resp, 'r', sizeof resp);
    double t_begin = now_s();
    struct epoll_event evs[MAX_EVENTS];
    while (now_s() - t_begin < opt_max_seconds) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 200);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (stats_event(ep, fd, server_report)) continue;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    server_accepted++;
                    if ((size_t)c >= maxfd) {
                        close(c);
                        continue;
                    }
                    set_nodelay(c);
                    got[c] = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                continue;
            }
            if (echo) {
                if (write(fd, buf, (size_t)r) != r) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                    close(fd);
                }
                continue;
            }
            got[fd] += (int)r;
            if (got[fd] >= PAYLOAD_LEN) {
                /* Reply, then close first: the TIME_WAIT entry stays on this side. */
                ssize_t w = write(fd, resp, sizeof resp);
                (void)w;
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- clients */

struct conn {
    int fd;
    enum state st;
    enum mode mode;
    int inlen;
    int want; /* payload bytes still expected back */
    int64_t t0;
    unsigned char in[INBUF_LEN];
};

static int payload_len(enum mode m) { return m == M_RR ? PAYLOAD_LEN : m == M_HOLD ? 1 : 0; }

static int send_all(int fd, const void *p, size_t n) {
    /* Handshake messages are tiny; on a fresh loopback socket they always fit in one write. */
    return write(fd, p, n) == (ssize_t)n ? 0 : -1;
}

static int send_payload(struct conn *c) {
    unsigned char data[PAYLOAD_LEN];
    int n = payload_len(c->mode);
    memset(data, 'q', sizeof data);
    c->want = n;
    if (n == 0) {
        c->st = S_ESTABLISHED;
        return 0;
    }
    c->st = S_DATA;
    return send_all(c->fd, data, (size_t)n);
}

/* Called once the TCP connection to the proxy (or target) is up. */
static int on_connected(struct conn *c) {
    unsigned char msg[64 + PAYLOAD_LEN];
    uint16_t port = htons((uint16_t)opt_target);
    switch (opt_proto) {
    case P_NONE:
        return send_payload(c);
    case P_SOCKS5: {
        /* RFC 1928 greeting: version 5, one method, 0x00 no authentication. */
        static const unsigned char greet[3] = {5, 1, 0};
        c->st = S5_METHOD;
        return send_all(c->fd, greet, sizeof greet);
    }
    case P_SOCKS6: {
        /* draft-11 section "Requests": Version 6, CONNECT, Options Length 0,
         * Port, Padding 0, Address Type IPv4, 127.0.0.1; no options (no
         * authentication). The payload follows immediately (false start). */
        int n = 0, pl = payload_len(c->mode);
        msg[n++] = 6;
        msg[n++] = 1;
        msg[n++] = 0;
        msg[n++] = 0;
        memcpy(msg + n, &port, 2);
        n += 2;
        msg[n++] = 0;
        msg[n++] = 1;
        msg[n++] = 127;
        msg[n++] = 0;
        msg[n++] = 0;
        msg[n++] = 1;
        memset(msg + n, 'q', (size_t)pl);
        n += pl;
        c->want = pl;
        c->st = S6_AUTH;
        return send_all(c->fd, msg, (size_t)n);
    }
    }
    return -1;
}

static int addr_len(const unsigned char *p, int avail, int atyp_off, int socks6) {
    /* Length of the address field, or 0 if not yet known, -1 if invalid. */
    unsigned char atyp = p[atyp_off];
    if (atyp == 1) return 4;
    if (atyp == 4) return 16;
    if (atyp == 3) {
        if (avail < atyp_off + 2) return 0;
        int l = 1 + p[atyp_off + 1];
        if (socks6) l = (l + 3) & ~3; /* draft-11: the name is padded to a 4-byte multiple (D2) */
        return l;
    }
    return -1;
}

/* Consume what can be consumed from c->in; returns -1 on protocol failure. */
static int on_bytes(struct conn *c) {
    for (;;) {
        unsigned char *p = c->in;
        int avail = c->inlen, used = 0;
        switch (c->st) {
        case S5_METHOD:
            if (avail < 2) return 0;
            if (p[0] != 5 || p[1] != 0) return -1;
            used = 2;
            {
                unsigned char req[10] = {5, 1, 0, 1, 127, 0, 0, 1, 0, 0};
                uint16_t port = htons((uint16_t)opt_target);
                memcpy(req + 8, &port, 2);
                c->st = S5_REPLY;
                if (send_all(c->fd, req, sizeof req) < 0) return -1;
            }
            break;
        case S5_REPLY: {
            if (avail < 5) return 0;
            int al = addr_len(p, avail, 3, 0);
            if (al < 0 || p[0] != 5 || p[1] != 0) return -1;
            if (al == 0 || avail < 4 + al + 2) return 0;
            used = 4 + al + 2;
            memmove(p, p + used, (size_t)(avail - used));
            c->inlen -= used;
            if (send_payload(c) < 0) return -1;
            continue;
        }
        case S6_AUTH: {
            /* draft-11 section "Authentication Replies": Version, Type, Options Length. */
            if (avail < 4) return 0;
            if (p[0] != 6 || p[1] != 0) return -1;
            int optlen = (p[2] << 8) | p[3];
            if (avail < 4 + optlen) return 0;
            used = 4 + optlen;
            c->st = S6_OP;
            break;
        }
        case S6_OP: {
            /* section "Operation Replies": 8 fixed bytes, the address, the options. */
            if (avail < 9) return 0;
            if (p[0] != 6 || p[1] != 0) return -1;
            int optlen = (p[2] << 8) | p[3];
            int al = addr_len(p, avail, 7, 1);
            if (al < 0) return -1;
            if (al == 0 || avail < 8 + al + optlen) return 0;
            used = 8 + al + optlen;
            c->st = c->want > 0 ? S_DATA : S_ESTABLISHED;
            break;
        }
        case S_DATA:
            if (avail == 0) return 0;
            used = avail < c->want ? avail : c->want;
            c->want -= used;
            if (c->want == 0) c->st = c->mode == M_RR ? S_EOF : S_ESTABLISHED;
            break;
        case S_EOF:
            if (avail > 0) return -1; /* nothing may follow the 64-byte answer */
            return 0;
        default:
            return 0;
        }
        memmove(p, p + used, (size_t)(avail - used));
        c->inlen -= used;
    }
}

static int proxy_or_target_port(void) { return opt_proto == P_NONE ? opt_target : opt_proxy; }

/* Blocking handshake (bulk and hold): returns the fd in S_ESTABLISHED, or -1. */
static int open_blocking(enum mode m, double deadline) {
    struct conn c;
    memset(&c, 0, sizeof c);
    c.mode = m;
    c.fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c.fd < 0) return -1;
    set_nodelay(c.fd);
    struct sockaddr_in sa = loopback(proxy_or_target_port());
    struct timeval tv = {.tv_sec = 5};
    setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(c.fd, (struct sockaddr *)&sa, sizeof sa) < 0 || on_connected(&c) < 0) goto fail;
    while (c.st != S_ESTABLISHED) {
        if (now_s() > deadline) goto fail;
        ssize_t r = read(c.fd, c.in + c.inlen, (size_t)(INBUF_LEN - c.inlen));
        if (r <= 0) goto fail;
        c.inlen += (int)r;
        if (on_bytes(&c) < 0) goto fail;
    }
    if (c.inlen != 0) goto fail;
    tv.tv_sec = 0;
    setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (m == M_BULK) {
        int zero = 0;
        setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &zero, sizeof zero);
    }
    return c.fd;
fail:
    fprintf(stderr, "loadgen: handshake failed (state %d): %s\n", c.st, strerror(errno));
    close(c.fd);
    return -1;
}

static int cmd_bulk(void) {
    double deadline = now_s() + opt_max_seconds;
    int *fds = calloc((size_t)opt_streams, sizeof(int));
    for (int i = 0; i < opt_streams; i++) {
        fds[i] = open_blocking(M_BULK, deadline);
        if (fds[i] < 0) return 1;
        set_nonblock(fds[i]);
    }
    /* The source: a 4 MiB in-memory file sent with sendfile(2), so the client
     * never copies payload through user space. */
    const size_t fsize = 4 << 20;
    int mfd = memfd_create("loadgen", MFD_CLOEXEC);
    if (mfd < 0 || ftruncate(mfd, (off_t)fsize) < 0) die("memfd");
    char *m = mmap(NULL, fsize, PROT_WRITE, MAP_SHARED, mfd, 0);
    if (m == MAP_FAILED) die("mmap");
    for (size_t i = 0; i < fsize; i++) m[i] = (char)(i * 131 + 7);
    munmap(m, fsize);
    printf("connected\n");
    fflush(stdout);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    off_t *offs = calloc((size_t)opt_streams, sizeof(off_t));
    for (int i = 0; i < opt_streams; i++) {
        struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    uint64_t sent = 0;
    int open_streams = opt_streams;
    struct epoll_event evs[MAX_EVENTS];
    while (open_streams > 0 && now_s() < deadline) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 100);
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            for (int round = 0; round < 4; round++) {
                if (offs[i] >= (off_t)fsize) offs[i] = 0;
                ssize_t w = sendfile(fds[i], mfd, &offs[i], fsize - (size_t)offs[i]);
                if (w > 0) {
                    sent += (uint64_t)w;
                    continue;
                }
                if (w < 0 && (errno == EAGAIN || errno == EINTR)) break;
                epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
                close(fds[i]);
                open_streams--;
                break;
            }
        }
    }
    printf("sent %llu\n", (unsigned long long)sent);
    return 0;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static int rr_start(int ep, struct conn *c) {
    memset(c, 0, sizeof *c);
    c->mode = M_RR;
    c->st = S_CONNECTING;
    c->t0 = now_ns();
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) return -1;
    set_nodelay(c->fd);
    if (opt_sources > 1) {
        /* The port is chosen at connect() (NO_PORT): the 4-tuple, not the source, must be unique. */
        int one = 1;
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000001u + rr_source++ % (unsigned)opt_sources);
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) {
            close(c->fd);
            return -1;
        }
    }
    struct sockaddr_in sa = loopback(proxy_or_target_port());
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

static int cmd_rr(void) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct conn *conns = calloc((size_t)opt_concurrency, sizeof(struct conn));
    int64_t *lat = calloc((size_t)opt_count, sizeof(int64_t));
    int started = 0, ok = 0, failed = 0, active = 0;
    double t_begin = now_s(), deadline = t_begin + opt_max_seconds;
    int64_t ns_begin = now_ns();
    for (int i = 0; i < opt_concurrency && started < opt_count; i++) {
        started++;
        if (rr_start(ep, &conns[i]) == 0) active++;
        else conns[i].st = S_FAILED, failed++;
    }
    struct epoll_event evs[MAX_EVENTS];
    while (active > 0) {
        if (now_s() > deadline) break;
        int n = epoll_wait(ep, evs, MAX_EVENTS, 100);
        for (int k = 0; k < n; k++) {
            struct conn *c = evs[k].data.ptr;
            int bad = 0, finished = 0;
            if (c->st == S_CONNECTING) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err != 0 || !(evs[k].events & EPOLLOUT)) bad = 1;
                else {
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    if (on_connected(c) < 0) bad = 1;
                }
            } else {
                ssize_t r = read(c->fd, c->in + c->inlen, (size_t)(INBUF_LEN - c->inlen));
                if (r > 0) {
                    c->inlen += (int)r;
                    if (on_bytes(c) < 0) bad = 1;
                } else if (r == 0) {
                    if (c->st == S_EOF) finished = 1;
                    else bad = 1;
                } else if (errno != EAGAIN && errno != EINTR) {
                    bad = 1;
                }
            }
            if (!bad && !finished) continue;
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            active--;
            if (finished) lat[ok++] = now_ns() - c->t0;
            else failed++;
            if (started < opt_count && now_s() < deadline) {
                started++;
                if (rr_start(ep, c) == 0) active++;
                else failed++;
            }
        }
    }
    int64_t elapsed = now_ns() - ns_begin;
    /* Connections still open at the deadline are cut off by the time bound, not failures. */
    qsort(lat, (size_t)ok, sizeof(int64_t), cmp_i64);
    long double sum = 0;
    for (int i = 0; i < ok; i++) sum += lat[i];
    int64_t p50 = ok ? lat[ok / 2] : 0, p99 = ok ? lat[(int)((ok - 1) * 0.99)] : 0;
    printf("rr %d %d %d %lld %lld %lld %lld\n", ok, failed, active, (long long)elapsed, (long long)p50, (long long)p99,
           ok ? (long long)(sum / ok) : 0LL);
    return 0;
}


/* ---------------------------------------------------------------- delay shim */

/* A TCP forwarder adding a fixed one-way delay in each direction, for the
 * time-to-first-byte test. Deadlines are kept in nanoseconds and a timerfd
 * (an hrtimer) wakes the loop exactly at the earliest one, so deliveries are
 * late by tens of microseconds rather than the millisecond of an epoll timeout.
 * With --handshake 1 client bytes are delivered no earlier than three one-way
 * delays after the accept (SYN, SYN-ACK, then the data), which charges the TCP
 * handshake round trip that a loopback connect() skips; except the bytes that
 * rode in the SYN (TCP Fast Open, RFC 7413), which are delivered one delay after
 * the accept, as the SYN itself would be. Whether the SYN carried data the
 * kernel accepted is TCP_INFO's TCPI_OPT_SYN_DATA; how many bytes, the SYN's IPv4
 * total length less its IP and TCP headers (TCP_SAVED_SYN). Such a connection is
 * forwarded with TFO too (TCP_FASTOPEN_CONNECT: the first write, those same
 * bytes, rides in the SYN to the proxy), so the proxy sees what the client sent,
 * and whether the proxy accepted the SYN's data is counted (--stats 1). */

#define SHIM_EARLY_NS 300000

struct chunk {
    struct chunk *next;
    int64_t due;
    size_t len, off; /* len 0: the source closed; pass the EOF on */
    char data[];
};

struct dir {
    int src, dst;
    int64_t floor;
    size_t syn_left;   /* bytes still to read that came in the SYN (client side, TFO) */
    int64_t syn_floor; /* earliest delivery of those */
    int check_tfo;     /* upstream side: read TCPI_OPT_SYN_DATA at the first answer */
    struct chunk *head, *tail;
    int reading, finished;
};

struct pair {
    struct dir d[2]; /* d[0]: client -> upstream, d[1]: upstream -> client */
};

static struct dir **shim_by_fd; /* the direction each fd is the source of */
static size_t shim_maxfd;
static long long st_accepted, st_syn_data, st_syn_bytes, st_up_tfo, st_up_acked;

static void shim_report(void) {
    printf("stats %lld %lld %lld %lld %lld\n", st_accepted, st_syn_data, st_syn_bytes, st_up_tfo, st_up_acked);
    fflush(stdout);
}

/* Did the SYN of fd carry data that was acknowledged (connecting side) or accepted (listening side)? */
static int syn_data_flag(int fd) {
    struct tcp_info ti;
    socklen_t len = sizeof ti;
    memset(&ti, 0, sizeof ti);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0) return 0;
    return (ti.tcpi_options & TCPI_OPT_SYN_DATA) != 0;
}

/* Payload bytes of the SYN that opened fd (the listener set TCP_SAVE_SYN): IPv4 total length
 * less the IP header and the TCP header (data offset). 0 when unknown. */
static size_t saved_syn_payload(int fd) {
    unsigned char h[512];
    socklen_t len = sizeof h;
    if (getsockopt(fd, IPPROTO_TCP, TCP_SAVED_SYN, h, &len) < 0 || len < 40 || (h[0] >> 4) != 4) return 0;
    size_t ihl = (size_t)(h[0] & 15) * 4, total = ((size_t)h[2] << 8) | h[3];
    if (len < ihl + 20) return 0;
    size_t doff = (size_t)(h[ihl + 12] >> 4) * 4;
    return total > ihl + doff ? total - ihl - doff : 0;
}

static void shim_enqueue(struct dir *d, int64_t due, const char *p, size_t n) {
    struct chunk *c = malloc(sizeof *c + n);
    if (!c) die("malloc");
    c->next = NULL;
    c->due = due;
    c->len = n;
    c->off = 0;
    if (n) memcpy(c->data, p, n);
    if (d->tail) d->tail->next = c;
    else d->head = c;
    d->tail = c;
}

static void shim_close_pair(int ep, struct pair *pr) {
    for (int i = 0; i < 2; i++) {
        struct dir *d = &pr->d[i];
        while (d->head) {
            struct chunk *n = d->head->next;
            free(d->head);
            d->head = n;
        }
    }
    for (int i = 0; i < 2; i++) {
        int fd = pr->d[i].src;
        epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
        shim_by_fd[fd] = NULL;
        close(fd);
    }
    free(pr);
}

static int cmd_shim(void) {
    listen_tfo = 1;
    int lfd = listen_on(opt_port);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    ev.data.fd = tfd;
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    stats_watch(ep);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    shim_maxfd = rl.rlim_cur > 65536 ? 65536 : rl.rlim_cur;
    shim_by_fd = calloc(shim_maxfd, sizeof *shim_by_fd);
    struct pair **active = calloc(shim_maxfd, sizeof *active); /* open pairs, unordered */
    size_t nactive = 0;
    const int64_t delay = (int64_t)(opt_delay_us * 1000);
    int64_t next_due = 0;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* default slack is 50 us; we want the hrtimer exact */
    double t_begin = now_s();
    static char buf[65536];
    struct epoll_event evs[MAX_EVENTS];
    while (now_s() - t_begin < opt_max_seconds) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 500);
        for (int k = 0; k < n; k++) {
            int fd = evs[k].data.fd;
            if (stats_event(ep, fd, shim_report)) continue;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    int64_t accepted = now_ns();
                    st_accepted++;
                    /* Data the kernel accepted in the SYN (TFO) is already readable at accept. */
                    size_t syn_len = syn_data_flag(c) ? saved_syn_payload(c) : 0;
                    int u = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
                    struct sockaddr_in sa = loopback(opt_target);
                    int up_tfo = 0;
                    if (u >= 0 && syn_len > 0) {
                        /* connect() returns at once; the first write (the SYN's bytes) opens it. */
                        int one = 1;
                        up_tfo = setsockopt(u, IPPROTO_TCP, TCP_FASTOPEN_CONNECT, &one, sizeof one) == 0;
                    }
                    if (u < 0 || (size_t)u >= shim_maxfd || (size_t)c >= shim_maxfd ||
                        connect(u, (struct sockaddr *)&sa, sizeof sa) < 0) {
                        if (u >= 0) close(u);
                        close(c);
                        continue;
                    }
                    if (syn_len > 0) {
                        st_syn_data++;
                        st_syn_bytes += (long long)syn_len;
                    }
                    st_up_tfo += up_tfo;
                    set_nonblock(u);
                    set_nodelay(u);
                    set_nodelay(c);
                    struct pair *pr = calloc(1, sizeof *pr);
                    pr->d[0] = (struct dir){.src = c, .dst = u, .reading = 1,
                                            .floor = opt_handshake ? accepted + 3 * delay : 0,
                                            .syn_left = syn_len,
                                            .syn_floor = opt_handshake ? accepted + delay : 0};
                    pr->d[1] = (struct dir){.src = u, .dst = c, .reading = 1, .check_tfo = up_tfo};
                    active[nactive++] = pr;
                    shim_by_fd[c] = &pr->d[0];
                    shim_by_fd[u] = &pr->d[1];
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                    cev.data.fd = u;
                    epoll_ctl(ep, EPOLL_CTL_ADD, u, &cev);
                }
                continue;
            }
            if (fd == tfd) {
                uint64_t expirations;
                ssize_t r = read(tfd, &expirations, sizeof expirations);
                (void)r;
                continue;
            }
            struct dir *d = shim_by_fd[fd];
            if (!d || !d->reading) continue;
            ssize_t r = read(fd, buf, sizeof buf);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (d->check_tfo) {
                /* The proxy answered, so the handshake is over: did it take the SYN's data? */
                d->check_tfo = 0;
                st_up_acked += syn_data_flag(fd);
            }
            int64_t arrived = now_ns() + delay, due = arrived < d->floor ? d->floor : arrived;
            if (r > 0) {
                size_t off = 0;
                if (d->syn_left > 0) {
                    /* The SYN's bytes: one delay after the accept, not three. */
                    off = (size_t)r < d->syn_left ? (size_t)r : d->syn_left;
                    d->syn_left -= off;
                    shim_enqueue(d, arrived < d->syn_floor ? d->syn_floor : arrived, buf, off);
                }
                if ((size_t)r > off) shim_enqueue(d, due, buf + off, (size_t)r - off);
            } else {
                shim_enqueue(d, due, NULL, 0);
                d->reading = 0;
                /* Stop watching it: EPOLLHUP/EPOLLERR would fire on every wait until the pair closes. */
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            }
        }
        /* Deliver everything due, then arm the timer at the earliest deadline left. */
        int64_t t = now_ns(), next = 0;
        if (next_due && t < next_due && next_due - t <= SHIM_EARLY_NS) {
            /* The timer fires SHIM_EARLY_NS ahead (wake-up latency of a busy VM is ~0.1-0.2 ms);
             * spin the rest so that every delivery is on time. Bounded by SHIM_EARLY_NS. */
            while ((t = now_ns()) < next_due) {
            }
        }
        for (size_t a = 0; a < nactive; a++) {
            struct pair *pr = active[a];
            for (int i = 0; i < 2; i++) {
                struct dir *d = &pr->d[i];
                while (d->head && d->head->due <= t) {
                    struct chunk *c = d->head;
                    if (c->len == 0) {
                        shutdown(d->dst, SHUT_WR);
                        d->finished = 1;
                    } else {
                        ssize_t w = write(d->dst, c->data + c->off, c->len - c->off);
                        /* EINPROGRESS: a TFO connect without a cookie yet sent a plain SYN. */
                        if (w < 0 && (errno == EAGAIN || errno == EINPROGRESS)) {
                            c->due = t + 1000000; /* retry in 1 ms; never happens at this volume */
                            break;
                        }
                        if (w < 0) {
                            d->finished = pr->d[1 - i].finished = 1;
                        } else if ((size_t)w < c->len - c->off) {
                            c->off += (size_t)w;
                            c->due = t + 1000000;
                            break;
                        }
                    }
                    d->head = c->next;
                    if (!d->head) d->tail = NULL;
                    free(c);
                }
                if (d->head && (next == 0 || d->head->due < next)) next = d->head->due;
            }
            if (pr->d[0].finished && pr->d[1].finished) {
                active[a--] = active[--nactive];
                shim_close_pair(ep, pr);
            }
        }
        struct itimerspec its;
        memset(&its, 0, sizeof its);
        next_due = next;
        if (next) {
            int64_t arm = next - SHIM_EARLY_NS;
            if (arm <= t) arm = t + 1;
            its.it_value.tv_sec = arm / 1000000000LL;
            its.it_value.tv_nsec = arm % 1000000000LL;
        }
        timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
    }
    return 0;
}

static int cmd_hold(void) {
    double deadline = now_s() + opt_max_seconds;
    int *fds = calloc((size_t)opt_conns, sizeof(int));
    for (int i = 0; i < opt_conns; i++) {
        fds[i] = open_blocking(M_HOLD, deadline);
        if (fds[i] < 0) {
            printf("failed %d\n", i);
            return 1;
        }
    }
    printf("ready %d\n", opt_conns);
    fflush(stdout);
    /* Hold every connection idle until the harness closes our stdin (or the deadline). */
    for (;;) {
        double left = deadline - now_s();
        if (left <= 0) break;
        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        int r = poll(&pfd, 1, (int)(left * 1000) + 1);
        if (r > 0) {
            char b[64];
            if (read(0, b, sizeof b) <= 0) break;
        }
    }
    for (int i = 0; i < opt_conns; i++) close(fds[i]);
    return 0;
}

/* The least a user-space relay can do per byte: what socks6fast's engine is compared
 * with in `socks6fast bench ceiling`. Blocking splice(2) wakes only when the kernel
 * has bytes or room, so this is also the fewest wake-ups. The process ends by
 * alarm() at --max-seconds whatever happens (bounded by time). */
static int cmd_splicerelay(void) {
    alarm((unsigned)opt_max_seconds + 1);
    int lfd = listen_on(opt_port);
    fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) & ~O_NONBLOCK); /* listen_on() made it non-blocking */
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) die("pipe2");
    int cap = fcntl(pfd[1], F_SETPIPE_SZ, 1 << 20);
    if (cap < 0) cap = 1 << 16;
    for (int served = 0; served < 1000; served++) {
        int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) die("accept");
        int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in sa = loopback(opt_target);
        if (t < 0 || connect(t, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect target");
        size_t in_pipe = 0;
        for (;;) {
            ssize_t n = splice(c, NULL, pfd[1], NULL, (size_t)cap, SPLICE_F_MOVE);
            if (n <= 0) break;
            in_pipe = (size_t)n;
            while (in_pipe > 0) {
                ssize_t w = splice(pfd[0], NULL, t, NULL, in_pipe, SPLICE_F_MOVE);
                if (w <= 0) goto done;
                in_pipe -= (size_t)w;
            }
        }
    done:
        /* A broken pair may leave bytes in the pipe: start the next one empty. */
        close(pfd[0]);
        close(pfd[1]);
        if (pipe2(pfd, O_CLOEXEC) < 0) die("pipe2");
        fcntl(pfd[1], F_SETPIPE_SZ, cap);
        close(c);
        close(t);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen sink|rrserver|echo|bulk|rr|hold|shim|splicerelay [options]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--port")) opt_port = atoi(v);
        else if (!strcmp(k, "--proxy")) opt_proxy = atoi(v);
        else if (!strcmp(k, "--target")) opt_target = atoi(v);
        else if (!strcmp(k, "--streams")) opt_streams = atoi(v);
        else if (!strcmp(k, "--conns")) opt_conns = atoi(v);
        else if (!strcmp(k, "--concurrency")) opt_concurrency = atoi(v);
        else if (!strcmp(k, "--sources")) opt_sources = atoi(v) > 0 && atoi(v) < 255 ? atoi(v) : 1;
        else if (!strcmp(k, "--count")) opt_count = atoi(v);
        else if (!strcmp(k, "--warmup")) opt_warmup = atof(v);
        else if (!strcmp(k, "--seconds")) opt_seconds = atof(v);
        else if (!strcmp(k, "--max-seconds")) opt_max_seconds = atof(v);
        else if (!strcmp(k, "--sink-mode")) opt_splice = strcmp(v, "read") != 0;
        else if (!strcmp(k, "--delay-us")) opt_delay_us = atof(v);
        else if (!strcmp(k, "--handshake")) opt_handshake = atoi(v);
        else if (!strcmp(k, "--stats")) opt_stats = atoi(v);
        else if (!strcmp(k, "--proto")) {
            opt_proto = !strcmp(v, "5") ? P_SOCKS5 : !strcmp(v, "6") ? P_SOCKS6 : P_NONE;
        } else {
            fprintf(stderr, "loadgen: unknown option %s\n", k);
            return 2;
        }
    }
    if (opt_streams < 1 || opt_conns < 1 || opt_concurrency < 1 || opt_count < 1) {
        fprintf(stderr, "loadgen: counts must be >= 1\n");
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "sink")) return cmd_sink();
    if (!strcmp(cmd, "rrserver")) return cmd_server(0);
    if (!strcmp(cmd, "echo")) return cmd_server(1);
    if (!strcmp(cmd, "bulk")) return cmd_bulk();
    if (!strcmp(cmd, "rr")) return cmd_rr();
    if (!strcmp(cmd, "hold")) return cmd_hold();
    if (!strcmp(cmd, "shim")) return cmd_shim();
    if (!strcmp(cmd, "splicerelay")) return cmd_splicerelay();
    fprintf(stderr, "loadgen: unknown command %s\n", cmd);
    return 2;
}
