/* bench/tls_sink.c — an SMTP sink that offers STARTTLS (smtp-sink cannot), for the
 * policies-on bench (e2e.sh STS=1). Built by the bench scripts with
 * `cc -O2 ... -lssl -lcrypto -lpthread`.
 *
 *   tls_sink CERT.pem KEY.pem HOST:PORT
 *
 * Accepts every command (EHLO offers STARTTLS, PIPELINING, 8BITMIME, SIZE), throws
 * the messages away and, like `smtp-sink -c`, writes a running count to stdout after
 * every message and session: "sess=S quit=Q mesg=M\r" (bench/timer.py reads it).
 * One thread per connection: the bench opens at most a few dozen at a time, and a
 * thread blocked in read costs nothing; the TLS handshake and record layer are
 * OpenSSL's, so the sink costs a small fraction of the relay it receives from.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

static SSL_CTX *ctx;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long n_sess, n_quit, n_mesg;

struct conn {
  int fd;
  SSL *ssl;
  char buf[65536];
  size_t len, pos;
};

static void report(int sess, int quit, int mesg) {
  pthread_mutex_lock(&out_lock);
  n_sess += sess;
  n_quit += quit;
  n_mesg += mesg;
  printf("sess=%lu quit=%lu mesg=%lu\r", n_sess, n_quit, n_mesg);
  fflush(stdout);
  pthread_mutex_unlock(&out_lock);
}

static int c_write(struct conn *c, const char *s) {
  size_t n = strlen(s);
  if (c->ssl) return SSL_write(c->ssl, s, (int)n) == (int)n ? 0 : -1;
  while (n > 0) {
    ssize_t w = write(c->fd, s, n);
    if (w <= 0) return -1;
    s += w;
    n -= (size_t)w;
  }
  return 0;
}

/* One line (CRLF or LF stripped) into `line`; -1 at EOF or error. */
static int c_readline(struct conn *c, char *line, size_t max) {
  for (;;) {
    char *nl = memchr(c->buf + c->pos, '\n', c->len - c->pos);
    if (nl) {
      size_t n = (size_t)(nl - (c->buf + c->pos));
      size_t k = n;
      if (k > 0 && c->buf[c->pos + k - 1] == '\r') k--;
      if (k >= max) k = max - 1;
      memcpy(line, c->buf + c->pos, k);
      line[k] = 0;
      c->pos += n + 1;
      return 0;
    }
    if (c->pos > 0) {
      memmove(c->buf, c->buf + c->pos, c->len - c->pos);
      c->len -= c->pos;
      c->pos = 0;
    }
    if (c->len == sizeof c->buf) c->len = 0; /* an overlong line: dropped */
    int r = c->ssl ? SSL_read(c->ssl, c->buf + c->len, (int)(sizeof c->buf - c->len))
                   : (int)read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
    if (r <= 0) return -1;
    c->len += (size_t)r;
  }
}

static void *serve(void *arg) {
  struct conn *c = arg;
  char line[2048];
  int quit = 0;
  report(1, 0, 0);
  if (c_write(c, "220 tls-sink.bench.test ESMTP\r\n")) goto out;
  while (c_readline(c, line, sizeof line) == 0) {
    if (!strncasecmp(line, "EHLO", 4)) {
      c_write(c, c->ssl ? "250-tls-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n"
                        : "250-tls-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-STARTTLS\r\n250 SIZE 0\r\n");
    } else if (!strncasecmp(line, "STARTTLS", 8) && !c->ssl) {
      if (c_write(c, "220 2.0.0 go ahead\r\n")) break;
      c->len = c->pos = 0;
      c->ssl = SSL_new(ctx);
      SSL_set_fd(c->ssl, c->fd);
      if (SSL_accept(c->ssl) != 1) break;
    } else if (!strncasecmp(line, "DATA", 4)) {
      if (c_write(c, "354 go ahead\r\n")) break;
      int ok = 0;
      while (c_readline(c, line, sizeof line) == 0) {
        if (!strcmp(line, ".")) { ok = 1; break; }
      }
      if (!ok) break;
      if (c_write(c, "250 2.0.0 Ok: discarded\r\n")) break;
      report(0, 0, 1);
    } else if (!strncasecmp(line, "QUIT", 4)) {
      c_write(c, "221 2.0.0 Bye\r\n");
      quit = 1;
      break;
    } else if (!strncasecmp(line, "HELO", 4) || !strncasecmp(line, "MAIL", 4) ||
               !strncasecmp(line, "RCPT", 4) || !strncasecmp(line, "RSET", 4) ||
               !strncasecmp(line, "NOOP", 4)) {
      if (c_write(c, "250 2.0.0 Ok\r\n")) break;
    } else {
      if (c_write(c, "502 5.5.2 not here\r\n")) break;
    }
  }
out:
  if (quit) report(0, 1, 0);
  if (c->ssl) {
    SSL_shutdown(c->ssl);
    SSL_free(c->ssl);
  }
  close(c->fd);
  free(c);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: tls_sink CERT.pem KEY.pem HOST:PORT\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  ctx = SSL_CTX_new(TLS_server_method());
  if (!ctx || SSL_CTX_use_certificate_chain_file(ctx, argv[1]) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx, argv[2], SSL_FILETYPE_PEM) != 1) {
    ERR_print_errors_fp(stderr);
    return 1;
  }
  char host[256];
  snprintf(host, sizeof host, "%s", argv[3]);
  char *colon = strrchr(host, ':');
  if (!colon) return 2;
  *colon = 0;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(colon + 1))};
  if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) return 2;
  int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 1024)) {
    perror("tls_sink: listen");
    return 1;
  }
  for (;;) {
    int fd = accept(ls, NULL, NULL);
    if (fd < 0) continue;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = calloc(1, sizeof *c);
    c->fd = fd;
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 256 * 1024);
    if (pthread_create(&t, &at, serve, c)) {
      close(fd);
      free(c);
    }
    pthread_attr_destroy(&at);
  }
}
