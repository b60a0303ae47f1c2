/* A parent that keeps vfork()ing: every EVERY steps (argv[3], default 50) it writes "vfork S" and vforks a
 * child that sleeps SLEEP_MS (argv[4], default 1000) milliseconds before it exec()s /bin/true (odd vforks) or
 * _exit(7)s (even ones); the parent, blocked in vfork() meanwhile, then reaps it and writes "child S status X".
 * Between vforks it runs steps that mutate a heap buffer and write "step N checksum C" to argv[1] (one line per
 * step, line buffered), argv[2] steps (default 100000), 20 ms apart. Deterministic: a restarted run must
 * write exactly what a plain run writes. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    FILE *f = fopen(argc > 1 ? argv[1] : "vforker.out", "w");
    long steps = argc > 2 ? atol(argv[2]) : 100000;
    long every = argc > 3 ? atol(argv[3]) : 50;
    long sleep_ms = argc > 4 ? atol(argv[4]) : 1000;
    if (!f) { perror("fopen"); return 4; }
    setvbuf(f, NULL, _IOLBF, 0);
    size_t n = 1 << 18;                       /* 2 MiB of state */
    uint64_t *buf = malloc(n * sizeof(uint64_t));
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ULL;
    long forks = 0;
    for (long s = 1; s <= steps; s++) {
        uint64_t sum = 0;
        for (size_t i = 0; i < n; i += 64) { buf[i] = buf[i] * 6364136223846793005ULL + (uint64_t)s; sum ^= buf[i]; }
        fprintf(f, "step %ld checksum %016llx\n", s, (unsigned long long)sum);
        if (s % every == 0) {
            forks++;
            fprintf(f, "vfork %ld\n", s);
            pid_t pid = vfork();
            if (pid == 0) {
                usleep(sleep_ms * 1000);
                if (forks % 2) execl("/bin/true", "true", (char *)NULL);
                _exit(7);
            }
            if (pid < 0) { perror("vfork"); return 5; }
            int st = 0;
            if (waitpid(pid, &st, 0) != pid) { perror("waitpid"); return 6; }
            fprintf(f, "child %ld status %d\n", s, WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
        }
        usleep(20000);
    }
    fprintf(f, "done\n");
    fclose(f);
    return 0;
}
