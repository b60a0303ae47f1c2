/* hpcckpt program API for C/C++/Fortran: speaks the agent's line protocol (docs/aware.md) over the UNIX socket
 * named in HPCCKPT_AWARE. One connection per process (made again after fork); calls are serialised by a mutex.
 * The connection is part of the checkpoint: after a restart it leads to the new agent, which answers a call
 * that was waiting for its checkpoint with "restarted". */
#define _GNU_SOURCE
#include "hpcckpt_aware.h"

#include <errno.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int sock = -1;
static pid_t sock_pid;
static long next_id = 1;
static int delay_depth;
static char last_error[256];

static void set_error(const char *what, const char *why) {
    snprintf(last_error, sizeof last_error, "%s: %s", what, why);
}

const char *hpcckpt_last_error(void) { return last_error; }

int hpcckpt_is_enabled(void) {
    const char *name = getenv("HPCCKPT_AWARE");
    return name && *name;
}

static int connect_agent(void) {
    if (sock >= 0 && sock_pid == getpid()) return 0;
    if (sock >= 0) sock = -1;             /* inherited across fork: the parent's conversation, leave it alone */
    const char *name = getenv("HPCCKPT_AWARE");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t n = strlen(name);
    if (n >= sizeof sa.sun_path) { set_error("HPCCKPT_AWARE", "name too long"); return -1; }
    memcpy(sa.sun_path, name, n);
    if (name[0] == '@') sa.sun_path[0] = '\0';      /* abstract name */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, offsetof(struct sockaddr_un, sun_path) + n) != 0) {
        set_error("cannot reach the hpcckpt agent", strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    sock = fd;
    sock_pid = getpid();
    return 0;
}

static int send_all(const char *buf, size_t len) {
    while (len) {
        ssize_t w = send(sock, buf, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) { set_error("sending to the hpcckpt agent", strerror(errno)); return -1; }
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

/* the reply line carrying "id":id (event lines meant for Python hooks are skipped: C has none) */
static int read_reply(long id, char *line, size_t cap) {
    char want[48];
    snprintf(want, sizeof want, "\"id\":%ld", id);
    size_t used = 0;
    for (;;) {
        ssize_t r = recv(sock, line + used, 1, 0);       /* a byte at a time: replies are short and rare */
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            set_error("the connection to the hpcckpt agent was lost", r < 0 ? strerror(errno) : "closed");
            close(sock);
            sock = -1;
            return -1;
        }
        if (line[used] == '\n') {
            line[used] = '\0';
            if (strstr(line, want)) return 0;
            used = 0;
            continue;
        }
        if (++used >= cap - 1) used = 0;                  /* an over-long line is not ours */
    }
}

static int call(const char *op_fields, char *reply, size_t cap) {
    if (!hpcckpt_is_enabled()) { set_error("hpcckpt", "not running under hpcckpt"); return HPCCKPT_NOT_ENABLED; }
    if (connect_agent() != 0) return HPCCKPT_ERROR;
    long id = next_id++;
    char msg[256];
    int n = snprintf(msg, sizeof msg, "{%s,\"id\":%ld}\n", op_fields, id);
    if (send_all(msg, (size_t)n) != 0 || read_reply(id, reply, cap) != 0) return HPCCKPT_ERROR;
    const char *err = strstr(reply, "\"error\":\"");
    if (err) { set_error("hpcckpt agent", err + 9); return HPCCKPT_ERROR; }
    return 1;
}

int hpcckpt_checkpoint(void) {
    char reply[1024];
    pthread_mutex_lock(&lock);
    int rc = call("\"op\":\"checkpoint\"", reply, sizeof reply);
    pthread_mutex_unlock(&lock);
    if (rc != 1) return rc;
    if (strstr(reply, "\"result\":\"restarted\"")) return HPCCKPT_RESTARTED;
    if (strstr(reply, "\"result\":\"checkpointed\"")) return HPCCKPT_CHECKPOINTED;
    set_error("hpcckpt agent", "unexpected answer");
    return HPCCKPT_ERROR;
}

int hpcckpt_delay_begin(void) {
    char reply[512];
    int rc = 0;
    pthread_mutex_lock(&lock);
    if (hpcckpt_is_enabled() && delay_depth++ == 0) rc = call("\"op\":\"delay\",\"on\":true", reply, sizeof reply);
    pthread_mutex_unlock(&lock);
    return rc < 0 ? HPCCKPT_ERROR : 0;
}

int hpcckpt_delay_end(void) {
    char reply[512];
    int rc = 0;
    pthread_mutex_lock(&lock);
    if (hpcckpt_is_enabled() && delay_depth > 0 && --delay_depth == 0)
        rc = call("\"op\":\"delay\",\"on\":false", reply, sizeof reply);
    pthread_mutex_unlock(&lock);
    return rc < 0 ? HPCCKPT_ERROR : 0;
}
