/* bench/smtp_senders.c — SMTP load generator that varies the envelope sender
 * (smtp-source cannot). Built by the bench scripts with `cc -O2`.
 *
 *   smtp_senders -s SESSIONS -m N -l SIZE -n SENDERS [-d DOMAIN] [-t RCPT]
 *                [-M HELO] [-r PER_SESSION] HOST:PORT
 *
 * Sends N messages of about SIZE octets over SESSIONS concurrent SMTP sessions, like
 * `smtp-source -s SESSIONS -m N -l SIZE` (one message per connection by default, no
 * PIPELINING: every command waits for its reply), but message i comes from
 * s<i mod SENDERS>@DOMAIN, so with N >= SENDERS a per-sender quota sees SENDERS
 * distinct keys. One thread, epoll, non-blocking sockets: in C because a Python
 * asyncio client spent ~0.4 ms of CPU per message, more than the relay it loads.
 *
 * Exit 0 only if every message got 250 to its final dot. A JSON summary goes to
 * stderr: messages, 250s, refusals by stage and code, connection errors, wall time,
 * and the generator's own CPU seconds (getrusage), so a caller can state its ceiling.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum st { S_GREET, S_EHLO, S_MAIL, S_RCPT, S_DATA, S_DOT, S_QUIT };
static const char *stname[] = {"greeting", "ehlo", "mail", "rcpt", "data", "dot", "quit"};

struct conn {
  int fd, state, left; /* left: messages still to send on this connection */
  long msg;            /* index of the current message */
  char in[8192];
  int inlen;
  char *out;
  int outlen, outoff;
};

static long n_total = 10000, next_msg = 0, done_msgs = 0, ok250 = 0, conn_errors = 0;
static long refused[7][600];
static int sessions = 20, size = 1024, per_session = 1;
static long senders = 10000;
static const char *domain = "example.com", *rcpt = "rcpt@example.net", *helo = "bench.local";
static struct sockaddr_in addr;
static int ep;
static char *fill;
static int fill_len;

static void die(const char *m) { perror(m); exit(2); }

static void queue_out(struct conn *c, const char *s, int len) {
  c->out = realloc(c->out, len);
  if (!c->out) die("realloc");
  memcpy(c->out, s, len);
  c->outlen = len;
  c->outoff = 0;
}

static int flush_out(struct conn *c) { /* 0 = all written, 1 = blocked, -1 = error */
  while (c->outoff < c->outlen) {
    ssize_t w = write(c->fd, c->out + c->outoff, c->outlen - c->outoff);
    if (w < 0) {
      if (errno == EAGAIN) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        return 1;
      }
      return -1;
    }
    c->outoff += w;
  }
  return 0;
}

static void send_str(struct conn *c, const char *s) { queue_out(c, s, strlen(s)); }

static int open_conn(struct conn *c) {
  /* claim up to per_session messages for this connection */
  if (next_msg >= n_total) return 0;
  c->left = per_session;
  if (c->left > n_total - next_msg) c->left = n_total - next_msg;
  c->msg = next_msg;
  next_msg += c->left;
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (c->fd < 0) die("socket");
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) die("connect");
  c->state = S_GREET;
  c->inlen = 0;
  c->outlen = c->outoff = 0;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
  return 1;
}

static void close_conn(struct conn *c) {
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  c->fd = -1;
}

static void send_mail(struct conn *c) {
  char b[512];
  snprintf(b, sizeof b, "MAIL FROM:<s%ld@%s>\r\n", c->msg % senders, domain);
  send_str(c, b);
  c->state = S_MAIL;
}

static void send_body(struct conn *c) {
  char h[512];
  int hl = snprintf(h, sizeof h,
                    "From: <s%ld@%s>\r\nTo: <%s>\r\nSubject: bench %ld\r\n"
                    "Message-ID: <%ld@bench.local>\r\n\r\n",
                    c->msg % senders, domain, rcpt, c->msg, c->msg);
  int want = size - hl;
  if (want < 0) want = 0;
  if (want > fill_len) want = fill_len;
  /* end on a line boundary so the dot is on its own line */
  while (want > 0 && fill[want - 1] != '\n') want--;
  c->out = realloc(c->out, hl + want + 3);
  if (!c->out) die("realloc");
  memcpy(c->out, h, hl);
  memcpy(c->out + hl, fill, want);
  memcpy(c->out + hl + want, ".\r\n", 3);
  c->outlen = hl + want + 3;
  c->outoff = 0;
  c->state = S_DOT;
}

/* one complete reply with code `code` arrived: advance the state machine.
 * Returns 0 to keep going, 1 when the connection is finished. */
static int on_reply(struct conn *c, int code) {
  int want = c->state == S_GREET ? 220 : c->state == S_DATA ? 354 : c->state == S_QUIT ? 221 : 250;
  if (code != want && c->state != S_QUIT) {
    if (code >= 0 && code < 600) refused[c->state][code]++;
    if (c->state == S_GREET || c->state == S_EHLO) { /* count every message of it as failed */
      done_msgs += c->left;
      return 1;
    }
    if (c->state != S_DOT) { /* the transaction is dead: RSET is not worth a round trip, quit */
      done_msgs += c->left;
      c->left = 0;
      send_str(c, "QUIT\r\n");
      c->state = S_QUIT;
      return 0;
    }
  }
  switch (c->state) {
  case S_GREET: {
    char b[300];
    snprintf(b, sizeof b, "EHLO %s\r\n", helo);
    send_str(c, b);
    c->state = S_EHLO;
    break;
  }
  case S_EHLO: send_mail(c); break;
  case S_MAIL: {
    char b[300];
    snprintf(b, sizeof b, "RCPT TO:<%s>\r\n", rcpt);
    send_str(c, b);
    c->state = S_RCPT;
    break;
  }
  case S_RCPT: send_str(c, "DATA\r\n"); c->state = S_DATA; break;
  case S_DATA: send_body(c); break;
  case S_DOT:
    if (code == 250) ok250++;
    done_msgs++;
    c->left--;
    c->msg++;
    if (c->left > 0) send_mail(c);
    else { send_str(c, "QUIT\r\n"); c->state = S_QUIT; }
    break;
  case S_QUIT: return 1;
  }
  return 0;
}

static void fail_conn(struct conn *c) {
  conn_errors++;
  if (c->state != S_QUIT) done_msgs += c->left;
  close_conn(c);
}

static void on_readable(struct conn *c) {
  for (;;) {
    ssize_t r = read(c->fd, c->in + c->inlen, sizeof c->in - c->inlen);
    if (r < 0) {
      if (errno == EAGAIN) return;
      fail_conn(c);
      return;
    }
    if (r == 0) { fail_conn(c); return; }
    c->inlen += r;
    /* consume complete lines; a reply ends with a line whose 4th octet is not '-' */
    char *p = c->in, *end = c->in + c->inlen, *nl;
    while ((nl = memchr(p, '\n', end - p))) {
      int last = (nl - p >= 3) && p[3] != '-';
      int code = (nl - p >= 3) ? atoi(p) : -1;
      p = nl + 1;
      if (!last) continue;
      if (on_reply(c, code)) {
        close_conn(c);
        return;
      }
      int f = flush_out(c);
      if (f < 0) { fail_conn(c); return; }
    }
    c->inlen = end - p;
    memmove(c->in, p, c->inlen);
    if (c->inlen == sizeof c->in) { fail_conn(c); return; }
  }
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  int o;
  while ((o = getopt(argc, argv, "s:m:l:n:d:t:M:r:")) != -1) {
    switch (o) {
    case 's': sessions = atoi(optarg); break;
    case 'm': n_total = atol(optarg); break;
    case 'l': size = atoi(optarg); break;
    case 'n': senders = atol(optarg); break;
    case 'd': domain = optarg; break;
    case 't': rcpt = optarg; break;
    case 'M': helo = optarg; break;
    case 'r': per_session = atoi(optarg); break;
    default:
      fprintf(stderr, "usage: %s -s SESSIONS -m N -l SIZE -n SENDERS [-d DOMAIN] [-t RCPT] [-M HELO] [-r PER_SESSION] HOST:PORT\n", argv[0]);
      return 2;
    }
  }
  if (optind != argc - 1) { fprintf(stderr, "smtp_senders: HOST:PORT missing\n"); return 2; }
  if (sessions < 1 || n_total < 1 || senders < 1 || per_session < 1 || size < 0) {
    fprintf(stderr, "smtp_senders: -s, -m, -n and -r must be >= 1\n");
    return 2;
  }
  char *hp = strdup(argv[optind]), *colon = strrchr(hp, ':');
  if (!colon) { fprintf(stderr, "smtp_senders: target must be HOST:PORT\n"); return 2; }
  *colon = 0;
  addr.sin_family = AF_INET;
  addr.sin_port = htons(atoi(colon + 1));
  if (inet_pton(AF_INET, hp, &addr.sin_addr) != 1) { fprintf(stderr, "smtp_senders: HOST must be an IPv4 address\n"); return 2; }

  fill_len = size + 100;
  fill = malloc(fill_len);
  for (int i = 0; i < fill_len; i++) fill[i] = (i % 80 == 78) ? '\r' : (i % 80 == 79) ? '\n' : 'x';

  ep = epoll_create1(0);
  if (ep < 0) die("epoll_create1");
  struct conn *cs = calloc(sessions, sizeof *cs);
  int active = 0;
  double t0 = now();
  for (int i = 0; i < sessions; i++) {
    cs[i].fd = -1;
    if (open_conn(&cs[i])) active++;
  }
  struct epoll_event evs[256];
  while (active > 0) {
    int n = epoll_wait(ep, evs, 256, 60000);
    if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
    if (n == 0) { fprintf(stderr, "smtp_senders: no progress for 60 s\n"); break; }
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (c->fd < 0) continue;
      if (evs[i].events & EPOLLOUT) {
        int f = flush_out(c);
        if (f < 0) fail_conn(c);
        else if (f == 0) {
          struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
          epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        }
      }
      if (c->fd >= 0 && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) on_readable(c);
      if (c->fd < 0) { /* finished or failed: reuse the slot for the next connection */
        if (!open_conn(c)) active--;
      }
    }
  }
  double wall = now() - t0;
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
  fprintf(stderr, "{\"messages\": %ld, \"ok_250\": %ld, \"conn_errors\": %ld, \"wall_s\": %.3f, \"msg_s\": %.1f, "
                  "\"gen_cpu_s\": %.3f, \"gen_cpu_ms_per_msg\": %.4f, \"senders\": %ld, \"refused\": {",
          n_total, ok250, conn_errors, wall, n_total / wall, cpu, 1000 * cpu / n_total, senders);
  int first = 1;
  for (int s = 0; s < 7; s++)
    for (int code = 0; code < 600; code++)
      if (refused[s][code]) {
        fprintf(stderr, "%s\"%s_%d\": %ld", first ? "" : ", ", stname[s], code, refused[s][code]);
        first = 0;
      }
  fprintf(stderr, "}}\n");
  return ok250 == n_total ? 0 : 1;
}
