/* A small process tree with everything a checkpoint must keep:
 *   Z  exits at once with status 7 and stays a zombie until the parent reaps it at the very end;
 *   F  (feeder) writes the numbers 1..N into pipe A as fast as it can (the pipe is full most of the time);
 *   W  (worker, own session) reads pipe A slowly, writes x*x into pipe B, and every 100 numbers a line
 *      "W k" into the output file through the descriptor it shares with the parent (one offset);
 *   the parent reads pipe B and writes "i r" lines through that same shared descriptor.
 * W's lines say whether it still leads its own session and process group. At the end the parent reaps
 * everyone and writes "zombie 7" (the status the zombie exited with) and "done". Lines may interleave, but none may be lost, duplicated or overwritten.
 * Usage: tree OUT N */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void put(int fd, const char *s) {
    size_t n = strlen(s);
    while (n) { ssize_t w = write(fd, s, n); if (w <= 0) exit(9); s += w; n -= w; }
}

static int readn(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) { ssize_t r = read(fd, p, n); if (r <= 0) return -1; p += r; n -= r; }
    return 0;
}

int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "w");
    int out = fileno(f);
    long n = atol(argv[2]);
    int a[2], b[2];
    pipe(a);
    pipe(b);
    pid_t z = fork();
    if (z == 0) _exit(7);
    pid_t feeder = fork();
    if (feeder == 0) {
        close(a[0]); close(b[0]); close(b[1]);
        for (uint32_t i = 1; i <= n; i++) if (write(a[1], &i, 4) != 4) _exit(2);
        _exit(0);
    }
    pid_t w = fork();
    if (w == 0) {
        setsid();
        close(a[1]); close(b[0]);
        uint32_t x;
        for (long k = 1; readn(a[0], &x, 4) == 0; k++) {
            uint64_t r = (uint64_t)x * x;
            if (write(b[1], &r, 8) != 8) _exit(3);
            if (k % 100 == 0) {
                char line[64];
                int own = getsid(0) == getpid() && getpgrp() == getpid();
                snprintf(line, sizeof line, "W %ld %s\n", k, own ? "session-ok" : "session-BAD");
                put(out, line);
            }
            usleep(200);
        }
        _exit(0);
    }
    close(a[0]); close(a[1]); close(b[1]);
    uint64_t r;
    for (long i = 1; readn(b[0], &r, 8) == 0; i++) {
        char line[64];
        snprintf(line, sizeof line, "%ld %llu\n", i, (unsigned long long)r);
        put(out, line);
    }
    int st;
    waitpid(feeder, &st, 0);
    waitpid(w, &st, 0);
    char line[64];
    waitpid(z, &st, 0);
    snprintf(line, sizeof line, "zombie %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    put(out, line);
    put(out, "done\n");
    return 0;
}
