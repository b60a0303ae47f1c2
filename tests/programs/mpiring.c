/* The C twin of mpiring.py, for checkpoint tests of unmodified C MPI programs: every step each rank passes a
 * block of numbers around a ring (MPI_Sendrecv), mixes it with its own, and all ranks agree on a sum
 * (MPI_Allreduce); rank 0 appends one line per step to OUT and at the end the checksum of everything, and at the
 * start the host of every rank to OUT.hosts. The output does not depend on timing.
 *
 * usage: mpiring OUT STEPS [DELAY_MS [MB]]     (build: mpicc -O2 -o mpiring mpiring.c)
 * MB: megabytes of extra memory each rank fills with data (for bench/mpi.py).
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N 4096
static const uint64_t M = (1ULL << 61) - 1;

static uint64_t mulmod(uint64_t a, uint64_t b) { return (uint64_t)(((unsigned __int128)a * b) % M); }

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s OUT STEPS [DELAY_MS [MB]]\n", argv[0]);
        return 2;
    }
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *out = argv[1];
    long steps = atol(argv[2]);
    long delay_ms = argc > 3 ? atol(argv[3]) : 50;
    size_t extra = argc > 4 ? (size_t)atol(argv[4]) << 20 : 0;
    uint64_t *ballast = extra ? malloc(extra) : NULL;
    for (size_t i = 0, x = (size_t)rank + 1; ballast && i < extra / 8; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;       /* xorshift: data that does not compress */
        ballast[i] = x;
    }

    char host[256] = "", *hosts = rank == 0 ? malloc(256 * (size_t)size) : NULL;
    gethostname(host, sizeof host - 1);
    MPI_Gather(host, 256, MPI_CHAR, hosts, 256, MPI_CHAR, 0, MPI_COMM_WORLD);
    FILE *f = NULL;
    if (rank == 0) {
        char path[4096];
        snprintf(path, sizeof path, "%s.hosts", out);
        FILE *h = fopen(path, "w");
        for (int r = 0; h && r < size; r++)
            fprintf(h, "rank %d %s\n", r, hosts + 256 * (size_t)r);
        if (h)
            fclose(h);
        f = fopen(out, "a");
        if (!f) {
            perror(out);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }
    static uint64_t mine[N], recv[N];
    for (int i = 0; i < N; i++)
        mine[i] = ((uint64_t)(rank + 1) * 1000003 + (uint64_t)i * 7919) % M;
    uint64_t check = 0;
    for (long step = 0; step < steps; step++) {
        MPI_Sendrecv(mine, N, MPI_UINT64_T, (rank + 1) % size, 0, recv, N, MPI_UINT64_T, (rank - 1 + size) % size,
                     0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        uint64_t local = 0;
        for (int i = 0; i < N; i++) {
            mine[i] = (mulmod(mine[i], 31) + mulmod(recv[i], 17) + (uint64_t)step) % M;
            local = (local + mine[i]) % M;
        }
        uint64_t total = 0;
        MPI_Allreduce(&local, &total, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);  /* < size * 2^61: no wrap */
        check = (mulmod(check, 1000003) + total % M + (uint64_t)step) % M;
        if (f) {
            fprintf(f, "step %ld total %llu\n", step, (unsigned long long)total);
            fflush(f);
        }
        if (delay_ms > 0) {
            struct timespec ts = {delay_ms / 1000, (delay_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    uint64_t *all = rank == 0 ? malloc(sizeof(uint64_t) * (size_t)size) : NULL;
    MPI_Gather(&check, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
    if (f) {
        int agree = 1;
        for (int r = 1; r < size; r++)
            agree &= all[r] == all[0];
        fprintf(f, "checksum %llu agree %s ranks %d\n", (unsigned long long)all[0], agree ? "True" : "False", size);
        if (ballast)
            fprintf(f, "ballast %llx\n", (unsigned long long)ballast[extra / 8 - 1]);
        fclose(f);
    }
    MPI_Finalize();
    return 0;
}
