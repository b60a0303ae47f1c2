/* Memory changed between checkpoints in every way write tracking must see (hpcckpt/engine/wptrack.py): plain
 * stores to scattered pages and to a contiguous run, the kernel writing into the process (pread(2) from a
 * file), pages dropped with MADV_DONTNEED, a region unmapped and mapped again at the same address, a region
 * grown by mremap and a new region. Each step changes some of that deterministically and prints a checksum
 * of all of it, so a restarted run must print what an uninterrupted one does.
 * argv[1] output, argv[2] steps, argv[3] microseconds per step, argv[4] a scratch file. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PG 4096
#define BIG (16 << 20)
#define SMALL (1 << 20)

static uint64_t sum_of(const unsigned char *p, size_t n, uint64_t sum) {
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < n / 8; i++) sum = sum * 31 + w[i];
    return sum;
}

int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "w");
    long steps = atol(argv[2]), delay = atol(argv[3]);
    setvbuf(f, NULL, _IOLBF, 0);
    int fd = open(argv[4], O_RDWR | O_CREAT | O_TRUNC, 0600);
    unsigned char block[64 * 1024];
    for (size_t i = 0; i < sizeof block; i++) block[i] = (unsigned char)(i * 7 + 3);
    if (fd < 0 || write(fd, block, sizeof block) != (ssize_t)sizeof block) return 1;
    unsigned char *big = mmap(NULL, BIG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *small = mmap(NULL, SMALL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    size_t grow = SMALL;
    unsigned char *growing = mmap(NULL, grow, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *fresh = NULL;
    size_t fresh_len = 0;
    for (size_t i = 0; i < BIG; i++) big[i] = (unsigned char)(i * 13);
    memset(small, 5, SMALL);
    memset(growing, 9, grow);
    uint64_t x = 88172645463325252ULL;
    for (long s = 1; s <= steps; s++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        switch (s % 6) {
        case 0:                                      /* scattered stores */
            for (int k = 0; k < 8; k++) big[((x >> (k * 5)) % (BIG / PG)) * PG + k] += (unsigned char)s;
            break;
        case 1:                                      /* a contiguous run of pages */
            memset(big + (x % (BIG / PG - 64)) * PG, (int)s, 64 * PG);
            break;
        case 2:                                      /* the kernel writes: pread into the buffer */
            if (pread(fd, big + (x % (BIG / PG - 16)) * PG + 100, sizeof block, 0) != (ssize_t)sizeof block)
                return 1;
            break;
        case 3:                                      /* dropped pages read back as zeros */
            madvise(big + (x % (BIG / PG - 8)) * PG, 8 * PG, MADV_DONTNEED);
            break;
        case 4:                                      /* unmapped and mapped again, same place and size */
            munmap(small, SMALL);
            if (mmap(small, SMALL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
                != small)
                return 1;
            memset(small + (x % 64) * PG, (int)s, 3 * PG);
            break;
        case 5:                                      /* a region grows; another one appears */
            if (grow < 8 * SMALL) {
                unsigned char *g = mremap(growing, grow, grow + SMALL, MREMAP_MAYMOVE);
                if (g == MAP_FAILED) return 1;
                growing = g;
                memset(growing + grow, (int)s, SMALL / 2);
                grow += SMALL;
            }
            if (fresh) munmap(fresh, fresh_len);
            fresh_len = (1 + s % 5) * PG * 16;
            fresh = mmap(NULL, fresh_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            memset(fresh, (int)(s * 3), fresh_len);
            break;
        }
        uint64_t sum = sum_of(big, BIG, 0);
        sum = sum_of(small, SMALL, sum);
        sum = sum_of(growing, grow, sum);
        if (fresh) sum = sum_of(fresh, fresh_len, sum);
        fprintf(f, "step %ld sum %016llx\n", s, (unsigned long long)sum);
        usleep(delay);
    }
    return 0;
}
