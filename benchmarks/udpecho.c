/* udpecho: the UDP echo server and the closed-loop echo client of benchmarks/udp_echo.py.
 *
 * Loopback only (every address is 127.0.0.1); every loop is bounded by --max-seconds.
 *
 *   echo   --max-seconds S
 *          bind 127.0.0.1:0, print "port P", echo every datagram back to its source
 *          (recvmmsg/sendmmsg, 64 at a time) until max-seconds.
 *   client --target PORT --proto none|s6 [--aids HEX,HEX,...] --flows N --inflight K
 *          --size B --warmup S --seconds S --max-seconds S
 *          N flows, one UDP socket each (with s6: flow i is the association of the i-th
 *          Association ID and its datagrams carry a 20-byte SOCKS 6 Datagram Header naming
 *          the echo server, 127.0.0.1:--echo-port). Each flow keeps K datagrams of B payload
 *          bytes in flight and sends a new one per reply. A flow silent for 200 ms refills
 *          its window (the missing datagrams count as lost). Prints "start" when the
 *          measured window opens (after warmup), then
 *          "done ECHOES ELAPSED_NS LOST P50_NS P99_NS" (round trips of the window).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXF 256
#define MAXLAT 2000000

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static const char *arg(int argc, char **argv, const char *name, const char *def) {
    for (int i = 2; i + 1 < argc; i += 2)
        if (strcmp(argv[i], name) == 0) return argv[i + 1];
    return def;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sa;
}

static int cmd_echo(int argc, char **argv) {
    double max_s = atof(arg(argc, argv, "--max-seconds", "60"));
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sa = loopback(0);
    socklen_t len = sizeof sa;
    int big = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
        perror("bind");
        return 1;
    }
    printf("port %d\n", ntohs(sa.sin_port));
    fflush(stdout);
    enum { B = 64 };
    static char bufs[B][65536];
    struct mmsghdr msgs[B];
    struct iovec iov[B];
    struct sockaddr_in peers[B];
    uint64_t end = now_ns() + (uint64_t)(max_s * 1e9);
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

struct flow {
    int fd;
    unsigned char aid[8];
    int inflight;
    uint64_t last_rx;
};

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int cmd_client(int argc, char **argv) {
    int target = atoi(arg(argc, argv, "--target", "0"));
    int echo_port = atoi(arg(argc, argv, "--echo-port", "0"));
    const char *proto = arg(argc, argv, "--proto", "none");
    const char *aids = arg(argc, argv, "--aids", "");
    int nflows = atoi(arg(argc, argv, "--flows", "4"));
    int window = atoi(arg(argc, argv, "--inflight", "4"));
    int size = atoi(arg(argc, argv, "--size", "64"));
    double warmup = atof(arg(argc, argv, "--warmup", "0.5"));
    double seconds = atof(arg(argc, argv, "--seconds", "3"));
    double max_s = atof(arg(argc, argv, "--max-seconds", "30"));
    int s6 = strcmp(proto, "s6") == 0;
    int hlen = s6 ? 20 : 0;
    if (nflows < 1 || nflows > MAXF || window < 1 || size < 8 || size > 60000) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    static struct flow flows[MAXF];
    static uint64_t lat[MAXLAT];
    size_t nlat = 0;
    unsigned char msg[65536];
    struct sockaddr_in dst = loopback(target);
    int ep = epoll_create1(0);
    for (int i = 0; i < nflows; i++) {
        struct flow *f = &flows[i];
        f->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (s6) {
            const char *h = aids + (size_t)i * 17;  /* 16 hex digits and a comma */
            if (strlen(aids) < (size_t)i * 17 + 16) {
                fprintf(stderr, "need %d association ids\n", nflows);
                return 2;
            }
            for (int k = 0; k < 8; k++) {
                unsigned v;
                sscanf(h + 2 * k, "%2x", &v);
                f->aid[k] = (unsigned char)v;
            }
        }
        if (connect(f->fd, (struct sockaddr *)&dst, sizeof dst) < 0) {
            perror("connect");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, f->fd, &ev);
    }
    memset(msg, 'e', sizeof msg);
    if (s6) {
        /* Datagram Header: 06 03 LEN AID(8) ATYP=1 00 PORT 127.0.0.1 (section "Handling UDP ASSOCIATE", D5) */
        msg[0] = 6;
        msg[1] = 3;
        msg[2] = (unsigned char)((hlen + size) >> 8);
        msg[3] = (unsigned char)((hlen + size) & 0xff);
        msg[12] = 1;
        msg[13] = 0;
        msg[14] = (unsigned char)(echo_port >> 8);
        msg[15] = (unsigned char)(echo_port & 0xff);
        msg[16] = 127;
        msg[17] = 0;
        msg[18] = 0;
        msg[19] = 1;
    }
    uint64_t t0 = now_ns();
    uint64_t start = t0 + (uint64_t)(warmup * 1e9);
    uint64_t stop = start + (uint64_t)(seconds * 1e9);
    uint64_t hard = t0 + (uint64_t)(max_s * 1e9);
    uint64_t echoes = 0, lost = 0;
    int started = 0;
    for (int i = 0; i < nflows; i++) flows[i].last_rx = t0;
    struct epoll_event evs[64];
    unsigned char rx[65536];
    for (;;) {
        uint64_t t = now_ns();
        if (t >= hard || t >= stop) break;
        if (!started && t >= start) {
            started = 1;
            echoes = 0;
            lost = 0;
            nlat = 0;
            printf("start\n");
            fflush(stdout);
        }
        for (int i = 0; i < nflows; i++) {
            struct flow *f = &flows[i];
            if (f->inflight > 0 && t - f->last_rx > 200000000ull) {
                lost += (uint64_t)f->inflight;
                f->inflight = 0;
            }
            while (f->inflight < window) {
                if (s6) memcpy(msg + 4, f->aid, 8);
                memcpy(msg + hlen, &t, 8); /* the send time rides in the payload */
                if (send(f->fd, msg, (size_t)(hlen + size), 0) < 0) break;
                f->inflight++;
                f->last_rx = t;
            }
        }
        int n = epoll_wait(ep, evs, 64, 50);
        for (int k = 0; k < n; k++) {
            struct flow *f = &flows[evs[k].data.u32];
            for (;;) {
                ssize_t r = recv(f->fd, rx, sizeof rx, 0);
                if (r < 0) break;
                if (r != hlen + size) continue;
                uint64_t sent, t2 = now_ns();
                memcpy(&sent, rx + hlen, 8);
                if (f->inflight > 0) f->inflight--;
                f->last_rx = t2;
                echoes++;
                if (started && nlat < MAXLAT) lat[nlat++] = t2 - sent;
                if (s6) memcpy(msg + 4, f->aid, 8);
                memcpy(msg + hlen, &t2, 8);
                if (send(f->fd, msg, (size_t)(hlen + size), 0) >= 0) f->inflight++;
            }
        }
    }
    uint64_t elapsed = now_ns() - start;
    qsort(lat, nlat, sizeof lat[0], cmp_u64);
    uint64_t p50 = nlat ? lat[nlat / 2] : 0, p99 = nlat ? lat[nlat * 99 / 100] : 0;
    printf("done %llu %llu %llu %llu %llu\n", (unsigned long long)echoes, (unsigned long long)elapsed,
           (unsigned long long)lost, (unsigned long long)p50, (unsigned long long)p99);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: udpecho echo|client ...\n");
        return 2;
    }
    if (strcmp(argv[1], "echo") == 0) return cmd_echo(argc, argv);
    if (strcmp(argv[1], "client") == 0) return cmd_client(argc, argv);
    fprintf(stderr, "unknown subcommand %s\n", argv[1]);
    return 2;
}
