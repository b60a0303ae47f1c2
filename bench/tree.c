/* Benchmark workload: a pipeline of N processes (argv[1], the parent included) that each touch MB megabytes
 * (argv[2]) of memory. The parent writes numbered tokens into a pipe; each next process reads a token, adds its
 * index and passes it on; the last one writes "count last-token" to OUT (argv[3]) once a second. Prints "ready"
 * on stdout when every process has touched its memory. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

unsigned char *mem;        /* global: the stores below must not be optimised away */

static void touch(long mb, int seed) {
    size_t n = (size_t)mb << 20;
    mem = malloc(n);
    for (size_t i = 0; i < n; i += 64) mem[i] = (unsigned char)(i / 4096 * 7 + seed + 1);
}

static void stage(int i, int last, int in, int outfd, const char *out) {
    FILE *r = fdopen(in, "r");
    FILE *w = last ? NULL : fdopen(outfd, "w");
    long v, count = 0;
    time_t shown = 0;
    while (fscanf(r, "%ld", &v) == 1) {
        if (w) { fprintf(w, "%ld\n", v + i); fflush(w); continue; }
        count++;
        if (time(NULL) != shown) {
            shown = time(NULL);
            FILE *o = fopen(out, "w");
            if (o) { fprintf(o, "%ld %ld\n", count, v); fclose(o); }
        }
    }
    _exit(0);
}

int main(int argc, char **argv) {
    int nproc = argc > 1 ? atoi(argv[1]) : 16;
    long mb = argc > 2 ? atol(argv[2]) : 16;
    const char *out = argc > 3 ? argv[3] : "/dev/null";
    int ready[2], first[2];
    if (pipe(ready) || pipe(first)) return 1;
    int in = first[0];
    for (int i = 1; i < nproc; i++) {
        int p[2] = {-1, -1};
        int last = i == nproc - 1;
        if (!last && pipe(p)) return 1;
        if (fork() == 0) {
            close(ready[0]);
            close(first[1]);
            if (p[0] >= 0) close(p[0]);
            touch(mb, i);
            if (write(ready[1], "x", 1) != 1) _exit(1);
            close(ready[1]);
            stage(i, last, in, p[1], out);
        }
        close(in);
        if (p[1] >= 0) close(p[1]);
        in = p[0];
    }
    close(ready[1]);
    touch(mb, 0);
    char c;
    for (int i = 1; i < nproc; i++)
        if (read(ready[0], &c, 1) != 1) return 1;
    close(ready[0]);
    printf("ready\n");
    fflush(stdout);
    FILE *w = fdopen(first[1], "w");
    for (long t = 0;; t++) {
        fprintf(w, "%ld\n", t);
        fflush(w);
        usleep(1000);
    }
}
