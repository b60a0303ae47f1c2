/* An inotify user. Usage: inotifywatch DIR OUT
 * Watches DIR/a (watch descriptor 1), DIR/b (2) and DIR/c (3), then removes the watch on DIR/b, so the live
 * watches have a gap (1, 3); writes "ready W1 W3" to OUT. Then it reads events (blocking) and writes one line
 * per event: "event WD MASK NAME" (MASK in hex, NAME "-" when the event has none). A file named "stop"
 * created in a watched directory makes it write "done" and exit. The removal's IN_IGNORED event for watch 2
 * is read before "ready". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

static FILE *out;

static int watch(int fd, const char *dir, const char *name) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int wd = inotify_add_watch(fd, path, IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_CLOSE_WRITE);
    if (wd < 0) {
        perror(path);
        exit(3);
    }
    return wd;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    out = fopen(argv[2], "a");
    if (!out) return 3;
    setvbuf(out, NULL, _IOLBF, 0);
    int fd = inotify_init1(IN_CLOEXEC);
    if (fd < 0) return 3;
    int a = watch(fd, argv[1], "a");
    int b = watch(fd, argv[1], "b");
    int c = watch(fd, argv[1], "c");
    if (inotify_rm_watch(fd, b) != 0) return 4;
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    ssize_t n = read(fd, buf, sizeof buf);          /* the IN_IGNORED of watch b */
    const struct inotify_event *ev = (const void *)buf;
    if (n < (ssize_t)sizeof *ev || ev->wd != b || !(ev->mask & IN_IGNORED)) {
        fprintf(out, "BAD first event\n");
        return 5;
    }
    fprintf(out, "ready %d %d\n", a, c);
    for (;;) {
        n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            fprintf(out, "BAD read %zd %s\n", n, n < 0 ? strerror(errno) : "eof");
            return 6;
        }
        for (char *p = buf; p < buf + n;) {
            ev = (const void *)p;
            fprintf(out, "event %d %x %s\n", ev->wd, ev->mask, ev->len ? ev->name : "-");
            if (ev->len && !strcmp(ev->name, "stop")) {
                fprintf(out, "done\n");
                return 0;
            }
            p += sizeof *ev + ev->len;
        }
    }
}
