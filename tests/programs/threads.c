/* Multi-threaded deterministic workload: NTHREADS (4) pthreads run rounds of AVX floating-point work
 * (values kept in ymm registers inside a tight loop, so a checkpoint landing mid-loop must restore the
 * extended FPU state exactly), then meet under a mutex/condition variable. The main thread writes one line per
 * round to argv[1] with every thread's result bit-exact (hex), its TLS counter (fs_base must be right) and a
 * shared mutex-protected total. argv[2] = rounds (default 200), argv[3] = inner loop length (default 3000000). */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NTHREADS 4
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_done = PTHREAD_COND_INITIALIZER, cv_go = PTHREAD_COND_INITIALIZER;
static int done_count, round_no, quit;
static double results[NTHREADS];
static unsigned long tls_seen[NTHREADS];
static uint64_t total;
static long inner = 3000000;
static __thread unsigned long tls_rounds;

static double work(int id, int r) {
    __m256d acc = _mm256_set_pd(1.0 + id, 0.5 + r, 0.25 * id + 1, 1.0 / (r + 1));
    const __m256d mul = _mm256_set1_pd(0.999999);
    const __m256d add = _mm256_set_pd(1e-7, 2e-7, 3e-7, 4e-7 * (id + 1));
    for (long i = 0; i < inner; i++)
        acc = _mm256_fmadd_pd(acc, mul, add);
    double out[4];
    _mm256_storeu_pd(out, acc);
    return out[0] + out[1] * 3 + out[2] * 5 + out[3] * 7;
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    int my_round = 0;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (round_no == my_round && !quit) pthread_cond_wait(&cv_go, &mu);
        if (quit) { pthread_mutex_unlock(&mu); return NULL; }
        my_round = round_no;
        pthread_mutex_unlock(&mu);
        double v = work(id, my_round);
        tls_rounds++;
        pthread_mutex_lock(&mu);
        results[id] = v;
        tls_seen[id] = tls_rounds;
        total += (uint64_t)(v * 1000) ^ (uint64_t)my_round;
        done_count++;
        pthread_cond_signal(&cv_done);
        pthread_mutex_unlock(&mu);
    }
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "threads.out";
    int rounds = argc > 2 ? atoi(argv[2]) : 200;
    if (argc > 3) inner = atol(argv[3]);
    FILE *f = fopen(path, "w");
    if (!f) { perror(path); return 4; }
    setvbuf(f, NULL, _IOLBF, 0);
    pthread_t th[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i);
    for (int r = 1; r <= rounds; r++) {
        pthread_mutex_lock(&mu);
        done_count = 0;
        round_no = r;
        pthread_cond_broadcast(&cv_go);
        while (done_count < NTHREADS) pthread_cond_wait(&cv_done, &mu);
        fprintf(f, "round %d total %016llx", r, (unsigned long long)total);
        for (int i = 0; i < NTHREADS; i++) {
            uint64_t bits; memcpy(&bits, &results[i], 8);
            fprintf(f, " %016llx/%lu", (unsigned long long)bits, tls_seen[i]);
        }
        fputc('\n', f);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_lock(&mu);
    quit = 1;
    pthread_cond_broadcast(&cv_go);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < NTHREADS; i++) pthread_join(th[i], NULL);
    fprintf(f, "done\n");
    fclose(f);
    return 0;
}
