/* Many processes of one computation (issue 20): a tree of N processes, each with its own memory and a pipe
 * to its parent.
 *   Process i (0 = root) forks children 3i+1, 3i+2, 3i+3 (those < N), so the tree is ~log3(N) deep.
 *   Each holds KB KiB filled with a pattern seeded by i (distinct content per process) and checks it, its
 *   pid and its parent's pid every TICK steps.
 *   Each non-root process writes a record (index, sequence number) into the pipe to its parent every step
 *   (MS milliseconds); the parent checks the sequence of each child has no gap and no repeat, so a record
 *   lost or replayed in a pipe across a checkpoint shows.
 *   Every TICK steps a process appends "tick i step wall-ms" to OUT; any mismatch appends "BAD i what".
 *   When the file OUT.stop exists, every process stops sending, drains and reaps its children, appends
 *   "exit i ok" and exits; the root appends "done N" last.
 * All lines go through O_APPEND descriptors, one write each, so they never overwrite each other.
 * Usage: many OUT N KB [MS] [TICK] */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FANOUT 3

static int out;
static long me;

static void say(const char *fmt, long a, long b) {
    char line[128];
    int n = snprintf(line, sizeof line, fmt, a, b);
    if (write(out, line, n) != n) _exit(9);
}

static uint64_t next(uint64_t *s) {
    *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
    return *s;
}

static void fill(uint64_t *buf, size_t words, long idx) {
    uint64_t s = 0x9E3779B97F4A7C15ull * (uint64_t)(idx + 1);
    for (size_t k = 0; k < words; k++) buf[k] = next(&s);
}

static int check(const uint64_t *buf, size_t words, long idx) {
    uint64_t s = 0x9E3779B97F4A7C15ull * (uint64_t)(idx + 1);
    for (size_t k = 0; k < words; k++) if (buf[k] != next(&s)) return 0;
    return 1;
}

struct rec { int32_t idx; int32_t seq; };

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: many OUT N KB [MS] [TICK]\n"); return 2; }
    out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    long n = atol(argv[2]);
    size_t words = (size_t)atol(argv[3]) * 1024 / 8;
    int ms = argc > 4 ? atoi(argv[4]) : 50;
    long tick = argc > 5 ? atol(argv[5]) : 10;
    char stop[4096];
    snprintf(stop, sizeof stop, "%s.stop", argv[1]);

    int up = -1;                       /* write end of the pipe to the parent */
    int kid_fd[FANOUT];
    long kid_idx[FANOUT];
    pid_t kid_pid[FANOUT];
    int32_t kid_seq[FANOUT];
    int nkids = 0;
    me = 0;
    for (;;) {                         /* fork my children; a child restarts this loop as its own index */
        int forked = 0;
        nkids = 0;
        for (int c = 1; c <= FANOUT; c++) {
            long idx = FANOUT * me + c;
            if (idx >= n) break;
            int p[2];
            if (pipe(p)) { perror("pipe"); return 3; }
            pid_t pid = fork();
            if (pid < 0) { perror("fork"); return 3; }
            if (pid == 0) {
                for (int k = 0; k < nkids; k++) close(kid_fd[k]);
                if (up >= 0) close(up);
                close(p[0]);
                up = p[1];
                me = idx;
                forked = 1;
                break;
            }
            close(p[1]);
            kid_fd[nkids] = p[0]; kid_idx[nkids] = idx; kid_pid[nkids] = pid; kid_seq[nkids] = 0;
            nkids++;
        }
        if (!forked) break;
    }
    uint64_t *buf = malloc(words * 8 + 8);
    fill(buf, words, me);
    pid_t mypid = getpid(), parent = getppid();
    say("ready %ld %ld\n", me, (long)mypid);

    int32_t seq = 0;
    int open_kids = nkids;
    int stopping = 0;
    for (long step = 1; up >= 0 || open_kids > 0; step++) {
        if (up >= 0) {
            if (stopping) { close(up); up = -1; }
            else {
                struct rec r = { (int32_t)me, ++seq };
                if (write(up, &r, sizeof r) != sizeof r) { say("BAD %ld write %ld\n", me, errno); return 4; }
            }
        }
        /* read what the children send until this step's time is up (a step per MS, however busy) */
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long due = now.tv_sec * 1000LL + now.tv_nsec / 1000000 + (stopping ? 20 : ms);
        for (;;) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            long long left = due - (now.tv_sec * 1000LL + now.tv_nsec / 1000000);
            if (left <= 0 || open_kids == 0) break;
            struct pollfd pf[FANOUT];
            for (int k = 0; k < nkids; k++) { pf[k].fd = kid_fd[k]; pf[k].events = POLLIN; }
            int r = poll(pf, nkids, (int)left);
            if (r < 0 && errno != EINTR) { say("BAD %ld poll %ld\n", me, errno); return 4; }
            for (int k = 0; r > 0 && k < nkids; k++) {
                if (kid_fd[k] < 0 || !(pf[k].revents & (POLLIN | POLLHUP))) continue;
                struct rec recs[64];
                ssize_t got = read(kid_fd[k], recs, sizeof recs);
                if (got == 0) { close(kid_fd[k]); kid_fd[k] = -1; open_kids--; continue; }
                if (got < 0 && errno == EINTR) continue;
                if (got < 0 || got % sizeof(struct rec)) {
                    say("BAD %ld short-read %ld\n", me, (long)got);   /* records are 8 bytes, writes atomic */
                    return 4;
                }
                for (ssize_t j = 0; j < got / (ssize_t)sizeof(struct rec); j++) {
                    if (recs[j].idx != kid_idx[k]) say("BAD %ld wrong-child %ld\n", me, recs[j].idx);
                    else if (recs[j].seq != kid_seq[k] + 1) say("BAD %ld seq-gap %ld\n", me, kid_idx[k]);
                    kid_seq[k] = recs[j].seq;
                }
            }
        }
        if (open_kids == 0 && up >= 0 && !stopping) {   /* a leaf: just wait for the step's time */
            clock_gettime(CLOCK_MONOTONIC, &now);
            long long left = due - (now.tv_sec * 1000LL + now.tv_nsec / 1000000);
            if (left > 0) poll(NULL, 0, (int)left);
        }
        if (step % tick == 0 && !stopping) {
            if (!check(buf, words, me)) say("BAD %ld memory %ld\n", me, step);
            if (getpid() != mypid) say("BAD %ld pid %ld\n", me, (long)getpid());
            if (me > 0 && getppid() != parent) say("BAD %ld ppid %ld\n", me, (long)getppid());
            struct timespec wall;
            clock_gettime(CLOCK_REALTIME, &wall);
            char line[128];                 /* the wall time tells ticks of a restored process from older ones */
            int k = snprintf(line, sizeof line, "tick %ld %ld %lld\n", me, step,
                             (long long)wall.tv_sec * 1000 + wall.tv_nsec / 1000000);
            if (write(out, line, k) != k) _exit(9);
            if (access(stop, F_OK) == 0) stopping = 1;
        }
    }
    for (int k = 0; k < nkids; k++) {
        int st;
        if (waitpid(kid_pid[k], &st, 0) != kid_pid[k] || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
            say("BAD %ld child-exit %ld\n", me, kid_idx[k]);
    }
    if (!check(buf, words, me)) say("BAD %ld memory-at-exit %ld\n", me, 0);
    say("exit %ld ok\n", me, 0);
    if (me == 0) say("done %ld\n", n, 0);
    return 0;
}
