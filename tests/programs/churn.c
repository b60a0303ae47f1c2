/* Threads are born and die all the time: each step starts 3 short-lived threads that do a little work and
 * exit, and joins them; a checkpoint will catch threads being created and exiting. One line per step to
 * argv[1]: "step N sum S" (deterministic). argv[2] = steps. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static void *work(void *arg) {
    uint64_t x = (uint64_t)(uintptr_t)arg;
    for (int i = 0; i < 20000; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return (void *)(uintptr_t)(x >> 40);
}

int main(int argc, char **argv) {
    FILE *f = fopen(argc > 1 ? argv[1] : "churn.out", "w");
    long steps = argc > 2 ? atol(argv[2]) : 3000;
    setvbuf(f, NULL, _IOLBF, 0);
    uint64_t sum = 0;
    for (long s = 1; s <= steps; s++) {
        pthread_t t[3];
        for (int i = 0; i < 3; i++) pthread_create(&t[i], NULL, work, (void *)(uintptr_t)(s * 3 + i));
        for (int i = 0; i < 3; i++) { void *r; pthread_join(t[i], &r); sum += (uintptr_t)r; }
        fprintf(f, "step %ld sum %llu\n", s, (unsigned long long)sum);
    }
    return 0;
}
