/* Prints getenv(argv[2]) once per step to argv[1] ("step N NAME=value" or "step N NAME unset"), argv[3] steps,
 * 20 ms apart; at the end a child started with system() prints it too (the environment passed on exec). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    FILE *out = fopen(argv[1], "a");
    setvbuf(out, NULL, _IOLBF, 0);
    long steps = atol(argv[3]);
    for (long i = 0; i < steps; i++) {
        const char *v = getenv(argv[2]);
        if (v) fprintf(out, "step %ld %s=%s\n", i, argv[2], v);
        else fprintf(out, "step %ld %s unset\n", i, argv[2]);
        usleep(20000);
    }
    char cmd[512];
    snprintf(cmd, sizeof cmd, "echo child ${%s-unset} >> %s", argv[2], argv[1]);
    fclose(out);
    return system(cmd) == 0 ? 0 : 1;
}
