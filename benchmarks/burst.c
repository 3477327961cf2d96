/* N HTTPS clients with a client certificate, started at one instant, in one
 * thread (non-blocking sockets, poll): each connects, does a full TLS
 * handshake, sends one GET and reads the answer (Content-Length).  Prints
 * one line per client: "ok SECONDS" (from the common start to the answer's
 * last byte) or "error WHY".  A C client, so that the clients cost the
 * machine far less CPU than the servers measured (benchmarks/serve_load.py).
 *
 *   burst PORT N CAFILE CERTFILE KEYFILE PATH
 *
 * Connects to 127.0.0.1, verifies the server as "localhost"; no session
 * resumption.  A client ends politely: it reads the server's close_notify,
 * sends its own, then closes. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TIMEOUT_S 60.0

enum state { CONNECTING, HANDSHAKE, WRITING, READING, CLOSING, DONE };

struct conn {
    int fd;
    SSL *ssl;
    enum state state;
    short events;
    char buf[16384];
    size_t len;
    double latency; /* < 0: not answered (yet) */
    char err[200];
};

static SSL_CTX *ctx;
static char request[512];
static double t0;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void finish(struct conn *c)
{
    if (c->ssl != NULL)
        SSL_free(c->ssl);
    c->ssl = NULL;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = DONE;
}

static void fail(struct conn *c, const char *what)
{
    unsigned long e = ERR_get_error();
    char ssl_err[160] = "";
    if (e != 0)
        ERR_error_string_n(e, ssl_err, sizeof ssl_err);
    ERR_clear_error();
    if (c->latency < 0) /* an error after the answer is not the client's failure */
        snprintf(c->err, sizeof c->err, "%s%s%s (errno %d)", what, ssl_err[0] ? ": " : "", ssl_err, errno);
    finish(c);
}

/* -1 on a TLS error, 0 to wait (events set), 1 when the call succeeded. */
static int want(struct conn *c, int r, const char *what)
{
    switch (SSL_get_error(c->ssl, r)) {
    case SSL_ERROR_WANT_READ:
        c->events = POLLIN;
        return 0;
    case SSL_ERROR_WANT_WRITE:
        c->events = POLLOUT;
        return 0;
    default:
        fail(c, what);
        return -1;
    }
}

static int answered(struct conn *c)
{
    c->buf[c->len] = '\0';
    char *end = strstr(c->buf, "\r\n\r\n");
    if (end == NULL)
        return 0;
    char *cl = strcasestr(c->buf, "\r\ncontent-length:");
    if (cl == NULL || cl > end)
        return -1;
    size_t body = strtoul(cl + 17, NULL, 10);
    return c->len >= (size_t)(end + 4 - c->buf) + body ? 1 : 0;
}

static void step(struct conn *c)
{
    int r;
    switch (c->state) {
    case CONNECTING: {
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
        if (soerr != 0) {
            errno = soerr;
            fail(c, "connect");
            return;
        }
        c->ssl = SSL_new(ctx);
        SSL_set_fd(c->ssl, c->fd);
        SSL_set_tlsext_host_name(c->ssl, "localhost");
        SSL_set1_host(c->ssl, "localhost");
        c->state = HANDSHAKE;
    }
        /* fall through */
    case HANDSHAKE:
        r = SSL_connect(c->ssl);
        if (r != 1) {
            want(c, r, "handshake");
            return;
        }
        c->state = WRITING;
        /* fall through */
    case WRITING:
        r = SSL_write(c->ssl, request, (int)strlen(request));
        if (r <= 0) {
            want(c, r, "write");
            return;
        }
        c->state = READING;
        /* fall through */
    case READING:
        for (;;) {
            if (c->len + 1 >= sizeof c->buf) {
                fail(c, "answer too long");
                return;
            }
            r = SSL_read(c->ssl, c->buf + c->len, (int)(sizeof c->buf - c->len - 1));
            if (r <= 0) {
                if (SSL_get_error(c->ssl, r) == SSL_ERROR_ZERO_RETURN) {
                    fail(c, "closed before the whole answer");
                    return;
                }
                want(c, r, "read");
                return;
            }
            c->len += (size_t)r;
            int a = answered(c);
            if (a < 0 || (a > 0 && strncmp(c->buf, "HTTP/1.1 200 ", 13) != 0)) {
                fail(c, "not a 200 answer with a Content-Length");
                return;
            }
            if (a > 0) {
                c->latency = now() - t0;
                c->state = CLOSING;
                break;
            }
        }
        /* fall through */
    case CLOSING:
        for (;;) {
            char sink[4096];
            r = SSL_read(c->ssl, sink, sizeof sink);
            if (r > 0)
                continue;
            if (SSL_get_error(c->ssl, r) == SSL_ERROR_ZERO_RETURN) {
                SSL_shutdown(c->ssl); /* our close_notify */
                finish(c);
                return;
            }
            if (want(c, r, "close") != 0)
                return; /* waiting, or the server closed without close_notify */
        }
    case DONE:
        return;
    }
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: burst PORT N CAFILE CERTFILE KEYFILE PATH\n");
        return 2;
    }
    int port = atoi(argv[1]), n = atoi(argv[2]);
    ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL || !SSL_CTX_load_verify_locations(ctx, argv[3], NULL) ||
        SSL_CTX_use_certificate_chain_file(ctx, argv[4]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[5], SSL_FILETYPE_PEM) != 1 || !SSL_CTX_check_private_key(ctx)) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", argv[6]);

    struct conn *conns = calloc((size_t)n, sizeof *conns);
    struct pollfd *pfds = calloc((size_t)n, sizeof *pfds);
    int *index = calloc((size_t)n, sizeof *index);
    if (conns == NULL || pfds == NULL || index == NULL)
        return 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    t0 = now();
    for (int i = 0; i < n; i++) {
        struct conn *c = &conns[i];
        c->latency = -1;
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->state = CONNECTING;
        c->events = POLLOUT;
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) != 0 && errno != EINPROGRESS)
            fail(c, "connect");
    }
    for (;;) {
        int m = 0;
        for (int i = 0; i < n; i++)
            if (conns[i].state != DONE) {
                pfds[m] = (struct pollfd){.fd = conns[i].fd, .events = conns[i].events};
                index[m++] = i;
            }
        if (m == 0 || now() - t0 > TIMEOUT_S)
            break;
        if (poll(pfds, (nfds_t)m, 1000) < 0 && errno != EINTR)
            break;
        for (int k = 0; k < m; k++)
            if (pfds[k].revents != 0)
                step(&conns[index[k]]);
    }
    for (int i = 0; i < n; i++) {
        struct conn *c = &conns[i];
        if (c->latency >= 0)
            printf("ok %.6f\n", c->latency);
        else
            printf("error %s\n", c->err[0] ? c->err : "timed out");
    }
    return 0;
}
