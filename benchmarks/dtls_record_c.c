/* The DTLS record layer's own cost in C, no Python: what a native data path would pay
 * per datagram (issue 11 item 4). Built and run by benchmarks/dtls_cost.py --c (needs gcc and
 * Debian's libssl-dev; Debian's OpenSSL, not the one inside cryptography's wheel).
 *
 * Two SSL objects over memory BIOs finish a DTLS 1.2 handshake in memory (ECDHE-ECDSA,
 * AES-256-GCM, as the Python figures), then for SIZE-byte datagrams: encrypt = SSL_write +
 * BIO_read of the record; decrypt = BIO_write of the record + SSL_read. Prints the CPU
 * microseconds per datagram of each (clock_gettime(CLOCK_PROCESS_CPUTIME_ID)).
 *
 * usage: dtls_record_c CERT.pem KEY.pem SIZE COUNT
 */
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "%s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

/* Move everything one side wrote into the other side's read BIO. */
static void pump(BIO *from, BIO *to) {
    char buf[65536];
    int n;
    while ((n = BIO_read(from, buf, sizeof buf)) > 0) {
        if (BIO_write(to, buf, n) != n) die("BIO_write");
    }
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s CERT KEY SIZE COUNT\n", argv[0]);
        return 2;
    }
    int size = atoi(argv[3]);
    long count = atol(argv[4]);
    SSL_CTX *sctx = SSL_CTX_new(DTLS_server_method());
    SSL_CTX *cctx = SSL_CTX_new(DTLS_client_method());
    if (!sctx || !cctx) die("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(sctx, DTLS1_2_VERSION);
    SSL_CTX_set_min_proto_version(cctx, DTLS1_2_VERSION);
    SSL_CTX_set_cipher_list(sctx, "ECDHE-ECDSA-AES256-GCM-SHA384");
    SSL_CTX_set_cipher_list(cctx, "ECDHE-ECDSA-AES256-GCM-SHA384");
    if (SSL_CTX_use_certificate_chain_file(sctx, argv[1]) != 1) die("certificate");
    if (SSL_CTX_use_PrivateKey_file(sctx, argv[2], SSL_FILETYPE_PEM) != 1) die("key");
    SSL_CTX_set_options(sctx, SSL_OP_NO_QUERY_MTU);
    SSL_CTX_set_options(cctx, SSL_OP_NO_QUERY_MTU);
    SSL *s = SSL_new(sctx), *c = SSL_new(cctx);
    BIO *s_in = BIO_new(BIO_s_mem()), *s_out = BIO_new(BIO_s_mem());
    BIO *c_in = BIO_new(BIO_s_mem()), *c_out = BIO_new(BIO_s_mem());
    BIO_set_mem_eof_return(s_in, -1);
    BIO_set_mem_eof_return(c_in, -1);
    SSL_set_bio(s, s_in, s_out);
    SSL_set_bio(c, c_in, c_out);
    SSL_set_mtu(s, 1400);
    SSL_set_mtu(c, 1400);
    SSL_set_accept_state(s);
    SSL_set_connect_state(c);
    for (int i = 0; i < 20 && !(SSL_is_init_finished(s) && SSL_is_init_finished(c)); i++) {
        SSL_do_handshake(c);
        pump(c_out, s_in);
        SSL_do_handshake(s);
        pump(s_out, c_in);
    }
    if (!SSL_is_init_finished(s) || !SSL_is_init_finished(c)) die("handshake");

    char *payload = calloc(1, size), *plain = malloc(65536), *record = malloc(65536);
    /* encrypt: the server's SSL_write + BIO_read of one record */
    double start = cpu_now();
    for (long i = 0; i < count; i++) {
        if (SSL_write(s, payload, size) != size) die("SSL_write");
        if (BIO_read(s_out, record, 65536) <= 0) die("BIO_read");
    }
    double encrypt = (cpu_now() - start) / count * 1e6;
    /* decrypt: records the client made beforehand, BIO_write + SSL_read on the server */
    int rec_len = 0;
    char **records = malloc(sizeof(char *) * count);
    int *lengths = malloc(sizeof(int) * count);
    for (long i = 0; i < count; i++) {
        if (SSL_write(c, payload, size) != size) die("client SSL_write");
        rec_len = BIO_read(c_out, record, 65536);
        records[i] = malloc(rec_len);
        memcpy(records[i], record, rec_len);
        lengths[i] = rec_len;
    }
    start = cpu_now();
    for (long i = 0; i < count; i++) {
        BIO_write(s_in, records[i], lengths[i]);
        if (SSL_read(s, plain, 65536) != size) die("SSL_read");
    }
    double decrypt = (cpu_now() - start) / count * 1e6;
    printf("%s %d %.3f %.3f\n", OpenSSL_version(OPENSSL_VERSION), size, decrypt, encrypt);
    return 0;
}
