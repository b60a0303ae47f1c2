/* Benchmark workload: touches MB megabytes (argv[1]) of memory with numeric data (doubles from a smooth
 * function: compresses like real simulation data, ratio ~1.05 with zstd-1), runs THREADS threads (argv[2]),
 * then idles. Prints "ready" on stdout when all memory is touched.
 *
 * Each SIGUSR1 makes it change PCT percent (argv[3], default 5) of its pages once (one double per page, other
 * pages each time), print "changed" and idle again: the benchmark of incremental images changes memory
 * exactly between two checkpoints, not while one is being written. argv[4]: "scattered" (default: pages
 * spread over the whole buffer, each alone) or "contiguous" (one run of pages). */
#include <math.h>
#include <pthread.h>
#include <signal.h>
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

static size_t gcd(size_t a, size_t b) { while (b) { size_t r = a % b; a = b; b = r; } return a; }

int main(int argc, char **argv) {
    long mb = argc > 1 ? atol(argv[1]) : 1024;
    nthreads = argc > 2 ? atoi(argv[2]) : 1;
    double pct = argc > 3 ? atof(argv[3]) : 5;
    int contiguous = argc > 4 && strcmp(argv[4], "contiguous") == 0;
    if (nthreads < 1 || nthreads > 64) nthreads = 1;
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);          /* inherited by every thread: taken by sigwait below */
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
        int sig;
        if (sigwait(&usr1, &sig) != 0) continue;
        /* k distinct pages: a stride coprime with the page count visits each page once per cycle */
        size_t k = (size_t)(pages * pct / 100.0), stride = 2654435761u % pages;
        while (stride > 1 && gcd(stride, pages) != 1) stride--;
        for (size_t j = 0; j < k; j++)
            buf[((step * k + j) * (contiguous ? 1 : stride) % pages) * 512] += 1.0;
        step++;
        printf("changed\n");
        fflush(stdout);
    }
}
