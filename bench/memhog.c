/* Benchmark workload: touches MB megabytes (argv[1]) of memory with numeric data (doubles from a smooth
 * function: compresses like real simulation data, ratio ~1.1 with zstd-1), runs THREADS threads (argv[2]),
 * then keeps changing PCT percent (argv[3], default 0) of its pages every second and idles otherwise.
 * Prints "ready" on stdout when all memory is touched. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static double *buf;
static size_t n;
static int nthreads;

static void *fill(void *arg) {
    long id = (long)arg;
    size_t lo = n * id / nthreads, hi = n * (id + 1) / nthreads;
    for (size_t i = lo; i < hi; i++) buf[i] = sin(i * 1e-3) * 1e3 + (double)(i % 977) * 1e-7;
    return NULL;
}

static void *idle(void *arg) { (void)arg; for (;;) sleep(1); return NULL; }

int main(int argc, char **argv) {
    long mb = argc > 1 ? atol(argv[1]) : 1024;
    nthreads = argc > 2 ? atoi(argv[2]) : 1;
    double pct = argc > 3 ? atof(argv[3]) : 0;
    n = (size_t)mb * 1024 * 1024 / sizeof(double);
    buf = malloc(n * sizeof(double));
    pthread_t t[64];
    for (long i = 0; i < nthreads; i++) pthread_create(&t[i], NULL, fill, (void *)i);
    for (long i = 0; i < nthreads; i++) pthread_join(t[i], NULL);
    for (long i = 1; i < nthreads; i++) pthread_create(&t[i], NULL, idle, NULL);
    printf("ready\n");
    fflush(stdout);
    size_t pages = n * sizeof(double) / 4096, step = 0;
    for (;;) {
        if (pct > 0) {
            size_t k = (size_t)(pages * pct / 100.0);
            for (size_t j = 0; j < k; j++) {
                size_t p = (j * 2654435761u + step * 97) % pages;
                buf[p * 512] += 1.0;
            }
            step++;
        }
        sleep(1);
    }
}
