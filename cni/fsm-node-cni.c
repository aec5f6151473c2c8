/*
 * fsm-node-cni: the chained CNI plugin of fsm-node (CNI spec 1.0).
 *
 * A thin relay, written in C because it runs on every pod creation and a
 * Node.js process start alone costs tens of milliseconds. It sends the CNI
 * command, its environment and its stdin (the plugin's conf with prevResult)
 * to the node agent over a local unix socket and writes the agent's answer to
 * stdout with the agent's exit code. Every decision (monitored namespace,
 * enrolment, CNI errors) is the agent's (src/cni/).
 *
 * When the agent cannot be reached, the plugin decides by the failurePolicy of
 * its own conf (written by the agent's installer):
 *   fail-closed (strict meshes): ADD and CHECK fail with a CNI error (code 11,
 *     "try again later"), so kubelet retries and no pod starts unmeshed;
 *   fail-open (permissive meshes): prevResult is passed through unchanged and
 *     the request is left in the spool directory, which the agent replays when
 *     it is back (it enrols the pod then).
 * DEL always succeeds (spooled when the agent is away). VERSION is answered here.
 *
 * Wire format to the agent (src/cni/protocol.ts):
 *   "FSMCNI1\n", then NUL-terminated "KEY=VALUE" entries for the CNI_* variables,
 *   an empty entry (a lone NUL), then the stdin bytes; end of stream by shutdown.
 * Answer: "<exit code>\n" followed by the bytes for stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_STDIN (4 << 20)
#define DEFAULT_SOCKET "/run/fsm-node-cni/cni.sock"
#define DEFAULT_TIMEOUT_MS 30000

static const char *cni_vars[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH", NULL};

static char *stdin_buf;
static size_t stdin_len;

/* ---- a tiny string-aware JSON scanner: top-level values of an object ---- */

static const char *skip_ws(const char *p, const char *end) {
  while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
  return p;
}

/* End of the JSON string starting at p (p points at the opening quote); NULL when unterminated. */
static const char *skip_string(const char *p, const char *end) {
  for (p++; p < end; p++) {
    if (*p == '\\') p++;
    else if (*p == '"') return p + 1;
  }
  return NULL;
}

/* End of the JSON value starting at p: strings, objects and arrays nested, scalars to the next delimiter. */
static const char *skip_value(const char *p, const char *end) {
  if (p >= end) return NULL;
  if (*p == '"') return skip_string(p, end);
  if (*p == '{' || *p == '[') {
    int depth = 0;
    while (p < end) {
      if (*p == '"') {
        p = skip_string(p, end);
        if (!p) return NULL;
        continue;
      }
      if (*p == '{' || *p == '[') depth++;
      else if (*p == '}' || *p == ']') {
        if (--depth == 0) return p + 1;
      }
      p++;
    }
    return NULL;
  }
  while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n' && *p != '\r' && *p != '\t') p++;
  return p;
}

/* The raw text of the top-level member `key` of the object in buf (not nested ones); 0 when absent. */
static int json_member(const char *buf, size_t len, const char *key, const char **vstart, const char **vend) {
  const char *end = buf + len;
  const char *p = skip_ws(buf, end);
  size_t klen = strlen(key);
  if (p >= end || *p != '{') return 0;
  p = skip_ws(p + 1, end);
  while (p < end && *p == '"') {
    const char *kstart = p + 1;
    const char *kend = skip_string(p, end);
    if (!kend) return 0;
    p = skip_ws(kend, end);
    if (p >= end || *p != ':') return 0;
    p = skip_ws(p + 1, end);
    const char *v = p;
    const char *ve = skip_value(p, end);
    if (!ve) return 0;
    if ((size_t)(kend - 1 - kstart) == klen && memcmp(kstart, key, klen) == 0) {
      *vstart = v;
      *vend = ve;
      return 1;
    }
    p = skip_ws(ve, end);
    if (p < end && *p == ',') p = skip_ws(p + 1, end);
  }
  return 0;
}

/* A top-level string member without escapes (paths, policy names), copied into out; 0 when absent. */
static int json_string(const char *key, char *out, size_t outlen) {
  const char *v, *ve;
  if (!json_member(stdin_buf, stdin_len, key, &v, &ve) || *v != '"' || ve - v < 2) return 0;
  size_t n = (size_t)(ve - v - 2);
  if (n >= outlen || memchr(v + 1, '\\', n)) return 0;
  memcpy(out, v + 1, n);
  out[n] = 0;
  return 1;
}

/* ---- output ---- */

static void json_escaped(FILE *f, const char *s) {
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
    else if (c < 0x20) fprintf(f, "\\u%04x", c);
    else fputc(c, f);
  }
}

/* A CNI error result on stdout, exit 1 (kubelet shows msg and details in the pod's events). */
static int cni_error(int code, const char *msg, const char *fmt, ...) {
  char details[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(details, sizeof details, fmt, ap);
  va_end(ap);
  char version[32] = "1.0.0";
  if (stdin_buf) json_string("cniVersion", version, sizeof version);
  printf("{\"cniVersion\":\"");
  json_escaped(stdout, version);
  printf("\",\"code\":%d,\"msg\":\"", code);
  json_escaped(stdout, msg);
  printf("\",\"details\":\"");
  json_escaped(stdout, details);
  printf("\"}\n");
  return 1;
}

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static int read_stdin(void) {
  size_t cap = 65536;
  stdin_buf = malloc(cap);
  if (!stdin_buf) return -1;
  for (;;) {
    if (stdin_len == cap) {
      if (cap >= MAX_STDIN) return -1;
      cap *= 2;
      char *n = realloc(stdin_buf, cap);
      if (!n) return -1;
      stdin_buf = n;
    }
    ssize_t r = read(0, stdin_buf + stdin_len, cap - stdin_len);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) return 0;
    stdin_len += (size_t)r;
  }
}

/* The request as the agent reads it; also what the spool keeps. */
static int send_request(int fd) {
  static const char magic[] = "FSMCNI1\n";
  if (write_all(fd, magic, sizeof magic - 1)) return -1;
  for (const char **v = cni_vars; *v; v++) {
    const char *val = getenv(*v);
    if (!val) continue;
    if (write_all(fd, *v, strlen(*v)) || write_all(fd, "=", 1) || write_all(fd, val, strlen(val) + 1)) return -1;
  }
  if (write_all(fd, "", 1)) return -1;
  return write_all(fd, stdin_buf, stdin_len);
}

/* Relay to the agent. Returns the exit code, or -1 with errno/reason set when the agent is unreachable. */
static int relay(const char *path, int timeout_ms, const char **why) {
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof addr.sun_path) {
    *why = "socket path too long";
    errno = ENAMETOOLONG;
    return -1;
  }
  strcpy(addr.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    *why = "socket";
    return -1;
  }
  struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
    *why = "connect";
    close(fd);
    return -1;
  }
  if (send_request(fd) || shutdown(fd, SHUT_WR)) {
    *why = "send";
    close(fd);
    return -1;
  }
  /* "<exit code>\n" then the body, streamed to stdout. */
  char buf[65536];
  size_t have = 0;
  int code = -1;
  for (;;) {
    ssize_t r = read(fd, buf + have, sizeof buf - have);
    if (r < 0) {
      if (errno == EINTR) continue;
      *why = errno == EAGAIN ? "no answer in time" : "receive";
      close(fd);
      return -1;
    }
    if (r == 0) break;
    have += (size_t)r;
    if (code < 0) {
      char *nl = memchr(buf, '\n', have);
      if (!nl) {
        if (have == sizeof buf) break;
        continue;
      }
      code = atoi(buf);
      size_t rest = have - (size_t)(nl + 1 - buf);
      if (write_all(1, nl + 1, rest)) break;
    } else if (write_all(1, buf, have)) break;
    have = 0;
  }
  close(fd);
  if (code < 0) {
    *why = "the agent closed the connection without an answer";
    errno = ECONNRESET;
    return -1;
  }
  return code;
}

/* Leave the request for the agent (fail-open ADD, any DEL): <spool>/<container id>, the latest command wins. */
static void spool(const char *dir, const char *container) {
  if (!dir[0] || !container || !container[0] || strchr(container, '/')) return;
  char tmp[4096], final[4096];
  if (snprintf(final, sizeof final, "%s/%s", dir, container) >= (int)sizeof final) return;
  if (snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, container) >= (int)sizeof tmp) return;
  mkdir(dir, 0700);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return;
  int bad = send_request(fd);
  bad |= close(fd);
  if (bad || rename(tmp, final)) unlink(tmp);
}

int main(void) {
  const char *cmd = getenv("CNI_COMMAND");
  if (!cmd || !cmd[0]) return cni_error(4, "CNI_COMMAND is not set", "fsm-node-cni is a CNI plugin: the container runtime runs it with CNI_COMMAND=ADD|DEL|CHECK|VERSION");
  if (strcmp(cmd, "VERSION") == 0) {
    char version[32] = "1.0.0";
    if (read_stdin() == 0) json_string("cniVersion", version, sizeof version);
    printf("{\"cniVersion\":\"");
    json_escaped(stdout, version);
    printf("\",\"supportedVersions\":[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\"]}\n");
    return 0;
  }
  if (read_stdin()) return cni_error(5, "cannot read the network configuration from stdin", "too large (over %d bytes) or unreadable", MAX_STDIN);

  char sock[256] = DEFAULT_SOCKET, policy[32] = "fail-closed", spool_dir[1024] = "", tmo[16] = "";
  json_string("socket", sock, sizeof sock);
  json_string("failurePolicy", policy, sizeof policy);
  json_string("spool", spool_dir, sizeof spool_dir);
  int timeout_ms = DEFAULT_TIMEOUT_MS;
  const char *tv, *tve;
  if (json_member(stdin_buf, stdin_len, "timeoutMs", &tv, &tve)) {
    size_t n = (size_t)(tve - tv) < sizeof tmo - 1 ? (size_t)(tve - tv) : sizeof tmo - 1;
    memcpy(tmo, tv, n);
    if (atoi(tmo) > 0) timeout_ms = atoi(tmo);
  }

  const char *why = "";
  fflush(stdout);
  int code = relay(sock, timeout_ms, &why);
  if (code >= 0) return code;
  int err = errno;
  const char *container = getenv("CNI_CONTAINERID");

  if (strcmp(cmd, "DEL") == 0 || strcmp(cmd, "GC") == 0) {
    if (strcmp(cmd, "DEL") == 0) spool(spool_dir, container);
    return 0; /* DEL always succeeds: a pod must always be deletable */
  }
  int open_ = strcmp(policy, "fail-open") == 0;
  if (!open_) {
    return cni_error(11, "fsm-node agent unreachable: pod not created so it cannot start outside the mesh (strict mesh, failurePolicy fail-closed); kubelet retries",
                     "%s %s: %s", why, sock, strerror(err));
  }
  if (strcmp(cmd, "ADD") == 0) {
    spool(spool_dir, container);
    const char *pv, *pve;
    if (json_member(stdin_buf, stdin_len, "prevResult", &pv, &pve)) {
      write_all(1, pv, (size_t)(pve - pv));
      write_all(1, "\n", 1);
      return 0;
    }
    return cni_error(7, "fsm-node-cni must be chained after the primary CNI plugin", "no prevResult in the network configuration (and the agent is unreachable at %s)", sock);
  }
  return 0; /* CHECK, fail-open */
}
