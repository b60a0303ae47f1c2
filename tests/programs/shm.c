/* Shared memory between a parent and its child, checked every round:
 *   an anonymous MAP_SHARED region created before fork (the parent posts the round number, the child answers);
 *   a memfd mapped by both, which the child also writes through its file descriptor (pwrite) and the parent
 *   reads through the mapping.
 * If sharing broke across a restart, the parent would wait forever (the test times out) or see wrong data.
 * One line per round to argv[1]: "round r ok"; argv[2] rounds. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "w");
    long rounds = atol(argv[2]);
    setvbuf(f, NULL, _IOLBF, 0);
    volatile uint64_t *sh = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int mfd = memfd_create("ring", 0);
    ftruncate(mfd, 65536);
    volatile uint64_t *ring = mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    for (int i = 0; i < 1000; i++) sh[1000 + i] = i * 7;           /* data set before the fork */
    pid_t c = fork();
    if (c == 0) {
        for (uint64_t r = 1;; r++) {
            while (sh[0] < r) usleep(500);
            if (sh[0] == UINT64_MAX) _exit(0);
            uint64_t v = r * r;
            pwrite(mfd, &v, 8, (r % 64) * 8);                      /* through the fd ... */
            sh[2000 + r % 1000] = sh[1000 + r % 1000] + r;           /* ... and the anonymous region */
            sh[1] = r;
        }
    }
    for (uint64_t r = 1; r <= (uint64_t)rounds; r++) {
        sh[0] = r;
        while (sh[1] < r) usleep(500);
        int ok = ring[r % 64] == r * r && sh[2000 + r % 1000] == (r % 1000) * 7 + r;
        fprintf(f, "round %llu %s\n", (unsigned long long)r, ok ? "ok" : "BAD");
        usleep(5000);
    }
    sh[0] = UINT64_MAX;
    waitpid(c, NULL, 0);
    fprintf(f, "done\n");
    return 0;
}
