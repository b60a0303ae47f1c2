/* Memory a copy-on-write fork does not hold as it is, and a parent that reaps with waitpid(-1):
 *   A: 1 MiB with MADV_DONTFORK (missing in a fork), B: 1 MiB with MADV_WIPEONFORK (zero in a fork);
 *   every step checks that A and B still hold the previous step's pattern, then writes this step's;
 *   a child process (so its snapshot is a grandchild-level fork) ticks a shared counter;
 *   the parent calls waitpid(-1, WNOHANG) every step: it must never reap a process it did not create.
 * One line per step to argv[1]: "step s ok" or "step s BAD <why>"; argv[2] steps. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define SZ (1 << 20)

static int check(uint64_t *p, uint64_t v) {
    for (size_t i = 0; i < SZ / 8; i += 512) if (p[i] != v * 1000003 + i) return 0;
    return 1;
}
static void fill(uint64_t *p, uint64_t v) { for (size_t i = 0; i < SZ / 8; i += 512) p[i] = v * 1000003 + i; }

int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "w");
    long steps = atol(argv[2]);
    setvbuf(f, NULL, _IOLBF, 0);
    uint64_t *a = mmap(NULL, SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *b = mmap(NULL, SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    volatile uint64_t *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    madvise(a, SZ, MADV_DONTFORK);
    madvise(b, SZ, MADV_WIPEONFORK);
    fill(a, 0);
    fill(b, 0);
    pid_t child = fork();
    if (child == 0) {
        for (;;) { shared[0]++; usleep(2000); }
    }
    for (long s = 1; s <= steps; s++) {
        char why[128] = "";
        if (!check(a, s - 1)) strcat(why, " dontfork-region");
        if (!check(b, s - 1)) strcat(why, " wipeonfork-region");
        int st;
        pid_t got = waitpid(-1, &st, WNOHANG);
        if (got != 0) { char t[48]; snprintf(t, sizeof t, " reaped-%d", got); strcat(why, t); }
        uint64_t before = shared[0];
        usleep(20000);
        /* a checkpoint may freeze us both mid-sleep and resume us first: give the child up to 2 s */
        for (int i = 0; i < 100 && shared[0] == before; i++)
            usleep(20000);
        if (shared[0] == before) strcat(why, " shared-counter-stuck");
        fill(a, s);
        fill(b, s);
        fprintf(f, "step %ld %s%s\n", s, why[0] ? "BAD" : "ok", why);
    }
    kill(child, 9);
    waitpid(child, NULL, 0);
    fprintf(f, "done\n");
    return 0;
}
