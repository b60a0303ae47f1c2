/* A program with a pseudo-terminal of its own, as `script` or Open MPI's prterun have one: the parent holds the
 * master, a child leads a session with the slave as controlling terminal and standard I/O.
 * Usage: ptypair OUT N
 * The parent types "in I" lines into the master, half a line at a time and faster than the child reads them
 * (unread input queues up at the slave, often with an unfinished line), and reads the master only now and
 * then (unread output queues up at the master). The child reads lines slowly and answers each with "got in I";
 * the terminal's echo is on, so every line typed also comes back once as typed. Every tenth answer goes
 * through a /dev/tty descriptor opened at the start instead of stdout. Before each answer the child checks that
 * the slave is still its controlling terminal with its group in the foreground (every 50th line also by opening
 * /dev/tty again), else it answers "BAD ctty". Everything the parent reads from the master goes to OUT
 * (carriage returns dropped); at the end it writes "done". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

static int out;

static int pump(int master) {
    char buf[4096], clean[4096];
    for (;;) {
        ssize_t n = read(master, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return 0;
        if (n <= 0) return -1;              /* EIO: the child has closed the slave */
        size_t k = 0;
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] != '\r') clean[k++] = buf[i];
        if (write(out, clean, k) != (ssize_t)k) return -1;
    }
}

static void child(const char *slave_name, long n) {
    setsid();
    int s = open(slave_name, O_RDWR);
    if (s < 0 || ioctl(s, TIOCSCTTY, 0) != 0) _exit(3);
    dup2(s, 0);
    dup2(s, 1);
    dup2(s, 2);
    if (s > 2) close(s);
    int tty = open("/dev/tty", O_WRONLY | O_CLOEXEC);
    if (tty < 0) _exit(3);
    char line[256];
    long seen = 0;
    while (fgets(line, sizeof line, stdin)) {
        usleep(20000);
        ++seen;
        int ok = tcgetsid(0) == getpid() && tcgetpgrp(0) == getpgrp();
        if (seen % 50 == 0) {
            int again = open("/dev/tty", O_RDWR | O_CLOEXEC);
            ok = ok && again >= 0;
            if (again >= 0) close(again);
        }
        if (!ok) printf("BAD ctty %ld\n", seen);
        if (seen % 10 == 0) {
            char buf[300];
            int len = snprintf(buf, sizeof buf, "got %s", line);
            fflush(stdout);
            if (write(tty, buf, len) != len) printf("BAD tty write %ld\n", seen);
        } else {
            printf("got %s", line);
        }
        fflush(stdout);
        if (seen == n) break;
    }
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    long n = atol(argv[2]);
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0 || grantpt(master) || unlockpt(master)) return 3;
    char name[64];
    if (ptsname_r(master, name, sizeof name)) return 3;
    pid_t pid = fork();
    if (pid == 0) child(name, n);
    fcntl(master, F_SETFL, O_NONBLOCK);
    char line[64];
    for (long i = 1; i <= n; i++) {
        int len = snprintf(line, sizeof line, "in %ld", i);
        while (write(master, line, len) < 0 && errno == EAGAIN) usleep(1000);
        usleep(3000);
        while (write(master, "\n", 1) < 0 && errno == EAGAIN) usleep(1000);
        usleep(7000);
        if (i % 20 == 0) pump(master);
    }
    while (pump(master) == 0) usleep(10000);
    waitpid(pid, NULL, 0);
    if (write(out, "done\n", 5) != 5) return 4;
    return 0;
}
