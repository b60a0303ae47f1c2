/* A large buffer (argv[2] MiB) of which each step changes a few pages (deterministic), with a checksum of
 * the whole buffer every 25 steps: the workload incremental checkpoints are for. argv[1] output, argv[3]
 * steps, argv[4] microseconds per step. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "w");
    size_t n = (size_t)atol(argv[2]) << 17;          /* 8-byte words */
    long steps = atol(argv[3]), delay = atol(argv[4]);
    setvbuf(f, NULL, _IOLBF, 0);
    uint64_t *b = malloc(n * 8), x = 88172645463325252ULL;
    for (size_t i = 0; i < n; i++) b[i] = i * 0x9E3779B97F4A7C15ULL;
    for (long s = 1; s <= steps; s++) {
        for (int k = 0; k < 4; k++) {                /* four pages change per step */
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            size_t page = x % (n / 512);
            for (size_t i = 0; i < 512; i++) b[page * 512 + i] += x + i;
        }
        if (s % 25 == 0) {
            uint64_t sum = 0;
            for (size_t i = 0; i < n; i++) sum = sum * 31 + b[i];
            fprintf(f, "step %ld sum %016llx\n", s, (unsigned long long)sum);
        }
        usleep(delay);
    }
    return 0;
}
