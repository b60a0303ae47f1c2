/* Deterministic workload for checkpoint/restart tests.
 * Holds a heap buffer of MB megabytes (argv[2], default 64) that every step mutates, and an open output
 * file (argv[1]) it appends one line per step to: "step N checksum C". Runs STEPS steps (argv[3], default
 * 100000), sleeping DELAY microseconds (argv[4], default 20000) between steps. The checksum depends on the
 * whole buffer, so any lost or corrupted page shows up as a different line. */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *out = argc > 1 ? argv[1] : "counter.out";
    long mb = argc > 2 ? atol(argv[2]) : 64;
    long steps = argc > 3 ? atol(argv[3]) : 100000;
    long delay = argc > 4 ? atol(argv[4]) : 20000;
    size_t n = (size_t)mb * 1024 * 1024 / sizeof(uint64_t);
    uint64_t *buf = malloc(n * sizeof(uint64_t));
    if (!buf) { perror("malloc"); return 3; }
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ULL;
    FILE *f = fopen(out, "w");
    if (!f) { perror(out); return 4; }
    setvbuf(f, NULL, _IOLBF, 0);
    uint64_t sum = 0;
    for (long step = 1; step <= steps; step++) {
        /* touch a pseudo-random stripe of pages plus fold the whole buffer every 16 steps */
        size_t stride = 4096 / sizeof(uint64_t);
        for (size_t i = (step * 7919) % stride; i < n; i += stride * 3) buf[i] = buf[i] * 6364136223846793005ULL + step;
        if (step % 16 == 0 || step == 1) { sum = 0; for (size_t i = 0; i < n; i++) sum = sum * 31 + buf[i]; }
        else sum = sum * 31 + buf[(step * 104729) % n];
        fprintf(f, "step %ld checksum %016llx\n", step, (unsigned long long)sum);
        printf("step %ld\n", step);
        fflush(stdout);
        if (delay) usleep(delay);
    }
    fclose(f);
    return 0;
}
