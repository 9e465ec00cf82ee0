# cython: language_level=3
# The few OpenSSL functions the native UDP engine calls on DTLS channels (issue 11), as C
# function-pointer types. The engine does not link any libssl: the pointers are taken once,
# at the first DTLS add_channel, from the OpenSSL that pyOpenSSL uses (cryptography's
# bundled one, through OpenSSL._util.lib), because the SSL* of a pyOpenSSL Connection is
# a struct of that library and no other (Debian's libssl has other struct layouts).
# void* stands for SSL* and BIO*: the engine only passes them through.

ctypedef int (*ssl_read_t)(void* ssl, void* buf, int num) noexcept nogil
ctypedef int (*ssl_write_t)(void* ssl, const void* buf, int num) noexcept nogil
ctypedef int (*ssl_get_error_t)(const void* ssl, int ret) noexcept nogil
ctypedef int (*ssl_shutdown_t)(void* ssl) noexcept nogil
ctypedef int (*bio_write_t)(void* bio, const void* data, int dlen) noexcept nogil
ctypedef int (*bio_read_t)(void* bio, void* data, int dlen) noexcept nogil
ctypedef void (*err_clear_error_t)() noexcept nogil

# SSL_get_error results (openssl/ssl.h).
cdef enum:
    SSL_ERROR_NONE = 0
    SSL_ERROR_SSL = 1
    SSL_ERROR_WANT_READ = 2
    SSL_ERROR_WANT_WRITE = 3
    SSL_ERROR_SYSCALL = 5
    SSL_ERROR_ZERO_RETURN = 6


cdef struct OpenSSLApi:
    ssl_read_t SSL_read
    ssl_write_t SSL_write
    ssl_get_error_t SSL_get_error
    ssl_shutdown_t SSL_shutdown
    bio_write_t BIO_write
    bio_read_t BIO_read
    err_clear_error_t ERR_clear_error
