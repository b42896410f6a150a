/* The STARTTLS load client of bench/tls_load.py, in C: same options, dialogue and report.
 *
 *     cc -O2 -o bench/tmp/tls_load bench/tls_load.c -lssl -lcrypto   (tls_bench.py does this)
 *     bench/tmp/tls_load -s 10 -m 2000 -l 1024 [--resume] [--plain] [--report F] 127.0.0.1:PORT
 *
 * Why a second client: the Python one costs about as much CPU per message as the servers it
 * measures, and on two shared cores that CPU is taken from them; this one leaves the
 * handshake's cryptography and the system calls. One forked process per session, blocking
 * sockets, a new connection per message: banner, EHLO, STARTTLS, handshake, EHLO,
 * MAIL/RCPT/DATA pipelined (RFC 2920), the message, QUIT. The certificate is not verified
 * (opportunistic TLS, as on port 25). --resume offers each process's previous session.
 * Every socket has a 30 s timeout and the run a deadline (--timeout), so it always ends; the
 * workers die with this process (PR_SET_PDEATHSIG). Exit 0 when every message got its 250.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct tally { long sent, failed, reused; char error[200]; };

struct opts {
    int sessions; long count; long size; int resume, plain; double timeout;
    const char *from, *to, *helo, *report; struct sockaddr_in addr;
};

struct conn { int fd; SSL *ssl; char buf[8192]; size_t len; };

static int conn_read(struct conn *c, char *p, size_t n) {
    if (c->ssl) {
        int r = SSL_read(c->ssl, p, (int)n);
        return r > 0 ? r : -1;
    }
    ssize_t r = recv(c->fd, p, n, 0);
    return r > 0 ? (int)r : -1;
}

static int conn_write(struct conn *c, const char *p, size_t n) {
    if (c->ssl) return SSL_write(c->ssl, p, (int)n) == (int)n ? 0 : -1;
    while (n > 0) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) return -1;
        p += w; n -= (size_t)w;
    }
    return 0;
}

/* Reads until `n` complete replies are in; 0 when the last has `code` and none is 4xx/5xx. */
static int expect(struct conn *c, int n, const char *code) {
    c->len = 0;
    for (;;) {
        int finals = 0, bad = 0;
        const char *last = NULL;
        for (size_t i = 0; i < c->len;) {
            char *eol = memchr(c->buf + i, '\n', c->len - i);
            if (!eol) break;
            if (eol - (c->buf + i) >= 4 && c->buf[i + 3] == ' ') {
                finals++;
                last = c->buf + i;
                if (c->buf[i] != '2' && c->buf[i] != '3') bad = 1;
            }
            i = (size_t)(eol - c->buf) + 1;
        }
        if (finals >= n) return (!bad && last && memcmp(last, code, 3) == 0) ? 0 : -1;
        if (c->len == sizeof c->buf) return -1;
        int r = conn_read(c, c->buf + c->len, sizeof c->buf - c->len);
        if (r < 0) return -1;
        c->len += (size_t)r;
    }
}

static int say(struct conn *c, const char *text, size_t n, int replies, const char *code) {
    return conn_write(c, text, n) == 0 ? expect(c, replies, code) : -1;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static char *message(const struct opts *o, size_t *len) {
    char head[512];
    int h = snprintf(head, sizeof head, "From: <%s>\r\nTo: <%s>\r\nSubject: tls load\r\n"
                     "Message-ID: <%d.%ld@client.bench.test>\r\n\r\n", o->from, o->to,
                     (int)getpid(), (long)time(NULL));
    static const char line[] =
        "La de da de da 1.2.3.4.5.6.7.8.9.0 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ\r\n";
    size_t body = o->size > h + 2 ? (size_t)o->size - (size_t)h - 2 : 0;
    char *m = malloc((size_t)h + body + 8);
    memcpy(m, head, (size_t)h);
    for (size_t i = 0; i < body; i++) m[h + i] = line[i % (sizeof line - 1)];
    size_t n = (size_t)h + body;
    while (n > (size_t)h && (m[n - 1] == '\r' || m[n - 1] == '\n')) n--;
    memcpy(m + n, "\r\n.\r\n", 5);
    *len = n + 5;
    return m;
}

/* One message over one connection; 0 on success. */
static int one(const struct opts *o, SSL_CTX *ctx, SSL_SESSION **session, int *reused,
               const char *envelope, const char *data, size_t data_len, const char *ehlo) {
    struct conn *c = calloc(1, sizeof *c);
    int rc = -1;
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = {30, 0};
    int one_ = 1;
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one_, sizeof one_);
    if (connect(c->fd, (struct sockaddr *)&o->addr, sizeof o->addr) != 0) goto out;
    if (expect(c, 1, "220") || say(c, ehlo, strlen(ehlo), 1, "250")) goto out;
    if (!o->plain) {
        if (say(c, "STARTTLS\r\n", 10, 1, "220")) goto out;
        c->ssl = SSL_new(ctx);
        SSL_set_fd(c->ssl, c->fd);
        if (*session) SSL_set_session(c->ssl, *session);
        if (SSL_connect(c->ssl) != 1) goto out;
    }
    if (say(c, ehlo, strlen(ehlo), 1, "250") || say(c, envelope, strlen(envelope), 3, "354")
        || say(c, data, data_len, 1, "250") || say(c, "QUIT\r\n", 6, 1, "221"))
        goto out;
    rc = 0;
    if (c->ssl) {
        *reused = SSL_session_reused(c->ssl);
        if (o->resume) {  /* the tickets came with the replies read after the handshake */
            if (*session) SSL_SESSION_free(*session);
            *session = SSL_get1_session(c->ssl);
        }
    }
out:
    if (c->ssl) {
        /* no close_notify on the wire (as the Python client), but a session freed without
         * a shutdown would be marked unresumable */
        if (rc == 0) {
            SSL_set_quiet_shutdown(c->ssl, 1);
            SSL_shutdown(c->ssl);
        }
        SSL_free(c->ssl);
    }
    close(c->fd);
    free(c);
    return rc;
}

static void worker(const struct opts *o, long n, int out_fd) {
    struct tally t = {0};
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    char envelope[1024], ehlo[300];
    snprintf(envelope, sizeof envelope, "MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n",
             o->from, o->to);
    snprintf(ehlo, sizeof ehlo, "EHLO %s\r\n", o->helo);
    size_t data_len;
    char *data = message(o, &data_len);
    SSL_SESSION *session = NULL;
    double deadline = now() + o->timeout;
    for (long i = 0; i < n; i++) {
        if (now() > deadline) {
            t.failed += n - i;
            snprintf(t.error, sizeof t.error, "deadline reached");
            break;
        }
        int reused = 0;
        if (one(o, ctx, &session, &reused, envelope, data, data_len, ehlo) == 0) {
            t.sent++;
            t.reused += reused;
        } else {
            t.failed++;
            if (!t.error[0]) {
                unsigned long e = ERR_peek_last_error();
                snprintf(t.error, sizeof t.error, "%s", e ? ERR_error_string(e, NULL)
                         : errno ? strerror(errno) : "unexpected reply");
            }
            ERR_clear_error();
            if (session) SSL_SESSION_free(session);
            session = NULL;
        }
    }
    if (write(out_fd, &t, sizeof t) != (ssize_t)sizeof t) _exit(2);
    _exit(0);
}

int main(int argc, char **argv) {
    struct opts o = {10, 1000, 1024, 0, 0, 600.0, "sender@bench.test", "rcpt@bench.test",
                     "client.bench.test", NULL, {0}};
    const char *target = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--resume")) o.resume = 1;
        else if (!strcmp(a, "--plain")) o.plain = 1;
        else if (v && !strcmp(a, "-s")) { o.sessions = atoi(v); i++; }
        else if (v && !strcmp(a, "-m")) { o.count = atol(v); i++; }
        else if (v && !strcmp(a, "-l")) { o.size = atol(v); i++; }
        else if (v && !strcmp(a, "-f")) { o.from = v; i++; }
        else if (v && !strcmp(a, "-t")) { o.to = v; i++; }
        else if (v && !strcmp(a, "-M")) { o.helo = v; i++; }
        else if (v && !strcmp(a, "--timeout")) { o.timeout = atof(v); i++; }
        else if (v && !strcmp(a, "--report")) { o.report = v; i++; }
        else if (a[0] != '-' && !target) target = a;
        else { fprintf(stderr, "usage: see bench/tls_load.py (unknown: %s)\n", a); return 2; }
    }
    const char *colon = target ? strrchr(target, ':') : NULL;
    if (!colon || o.sessions < 1 || o.count < 0 || o.size < 0) {
        fprintf(stderr, "usage: tls_load [-s N] [-m N] [-l SIZE] ... HOST:PORT\n");
        return 2;
    }
    char host[64];
    snprintf(host, sizeof host, "%.*s", (int)(colon - target), target);
    o.addr.sin_family = AF_INET;
    o.addr.sin_port = htons((unsigned short)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &o.addr.sin_addr) != 1) {
        fprintf(stderr, "an IPv4 address is needed: %s\n", host);
        return 2;
    }
    int fds[2];
    if (pipe(fds) != 0) return 2;
    for (int k = 0; k < o.sessions; k++) {
        long share = o.count / o.sessions + (k < o.count % o.sessions ? 1 : 0);
        pid_t pid = fork();
        if (pid == 0) { close(fds[0]); worker(&o, share, fds[1]); }
        if (pid < 0) return 2;
    }
    close(fds[1]);
    struct tally total = {0}, t;
    int got = 0;
    while (got < o.sessions && read(fds[0], &t, sizeof t) == (ssize_t)sizeof t) {
        got++;
        total.sent += t.sent;
        total.failed += t.failed;
        total.reused += t.reused;
        if (!total.error[0] && t.error[0]) memcpy(total.error, t.error, sizeof t.error);
    }
    while (wait(NULL) > 0) {}
    if (got < o.sessions) total.failed += o.count - total.sent - total.failed;
    for (char *p = total.error; *p; p++) if (*p == '"' || *p == '\\') *p = '\'';
    char json[512];
    snprintf(json, sizeof json, "{\"sent\": %ld, \"failed\": %ld, \"reused\": %ld, "
             "\"errors\": [%s%s%s], \"client\": \"c\"}", total.sent, total.failed, total.reused,
             total.error[0] ? "\"" : "", total.error, total.error[0] ? "\"" : "");
    if (o.report) {
        FILE *f = fopen(o.report, "w");
        if (f) { fputs(json, f); fclose(f); }
    }
    if (total.failed) fprintf(stderr, "%s\n", json);
    return total.failed == 0 && total.sent == o.count ? 0 : 1;
}
