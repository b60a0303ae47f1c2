/* The launched process forks a child and exits with status 7 at once; the child (a daemon-like survivor) goes
 * on for argv[2] steps of 20 ms, appending "step N" to argv[1], then "child done".
 *   outlive OUT STEPS */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long steps = atol(argv[2]);
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 1; }
    if (pid > 0) return 7;                        /* the launched process ends; its child outlives it */
    FILE *out = fopen(argv[1], "a");
    setvbuf(out, NULL, _IOLBF, 0);
    for (long i = 0; i < steps; i++) {
        fprintf(out, "step %ld\n", i);
        usleep(20000);
    }
    fprintf(out, "child done\n");
    return 0;
}
