/* The C program API: asks for a checkpoint at step argv[3], reports what hpcckpt_checkpoint() returned, and
 * waits to be killed after "checkpointed" (argv[4] seconds); a critical section in delay_begin/end.
 *   awarec OUT STEPS ASK_AT WAIT */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "hpcckpt_aware.h"

int main(int argc, char **argv) {
    FILE *out = fopen(argv[1], "a");
    setvbuf(out, NULL, _IOLBF, 0);
    long steps = atol(argv[2]), ask_at = atol(argv[3]), wait = atol(argv[4]);
    fprintf(out, "enabled %d\n", hpcckpt_is_enabled());
    if (!hpcckpt_is_enabled()) {
        fprintf(out, "checkpoint -> %d\n", hpcckpt_checkpoint());
        return 0;
    }
    for (long i = 0; i < steps; i++) {
        fprintf(out, "step %ld\n", i);
        usleep(10000);
        if (i == ask_at) {
            int r = hpcckpt_checkpoint();
            fprintf(out, "checkpoint -> %s\n", r == HPCCKPT_CHECKPOINTED ? "checkpointed" :
                    r == HPCCKPT_RESTARTED ? "restarted" : hpcckpt_last_error());
            if (r == HPCCKPT_CHECKPOINTED) sleep((unsigned)wait);
        }
        if (i == ask_at + 5) {
            if (hpcckpt_delay_begin() != 0) fprintf(out, "delay_begin failed: %s\n", hpcckpt_last_error());
            usleep(300000);
            if (hpcckpt_delay_end() != 0) fprintf(out, "delay_end failed: %s\n", hpcckpt_last_error());
        }
    }
    fprintf(out, "done\n");
    return 0;
}
