/* OpenMP workload (gcc -fopenmp): each step an integer reduction over a parallel loop with the static
 * schedule (deterministic), written to argv[1] as "step N sum S"; argv[2] = steps, argv[3] = usleep between. */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    FILE *f = fopen(argc > 1 ? argv[1] : "omp.out", "w");
    long steps = argc > 2 ? atol(argv[2]) : 1000;
    long delay = argc > 3 ? atol(argv[3]) : 5000;
    setvbuf(f, NULL, _IOLBF, 0);
    static uint64_t data[1 << 20];
    for (long i = 0; i < (1 << 20); i++) data[i] = (uint64_t)i * 2654435761u;
    for (long s = 1; s <= steps; s++) {
        uint64_t sum = 0;
#pragma omp parallel for schedule(static) reduction(+:sum)
        for (long i = 0; i < (1 << 20); i++) {
            data[i] = data[i] * 6364136223846793005ULL + (uint64_t)s;
            sum += data[i] >> 32;
        }
        fprintf(f, "step %ld sum %llu threads %d\n", s, (unsigned long long)sum, omp_get_max_threads());
        if (delay) usleep(delay);
    }
    return 0;
}
