/* A C program that checkpoints itself at a safe point (the program API, docs/aware.md).
 *   python -m hpcckpt.aware.build lib && gcc -o aware_c examples/aware_c.c -Ilib -Llib -lhpcckpt_aware -Wl,-rpath,$PWD/lib
 *   dmtcp_launch ./aware_c            # ... killed after its checkpoint? dmtcp_restart --from . carries it on */
#include <stdio.h>
#include <unistd.h>
#include "hpcckpt_aware.h"

int main(void) {
    double x = 0;
    for (int iter = 1; iter <= 100; iter++) {
        for (int i = 0; i < 1000000; i++) x += 1.0 / (iter + i);       /* one iteration of the model */
        if (iter % 25 == 0) {
            hpcckpt_delay_begin();                                      /* files consistent: no checkpoint now */
            printf("iteration %d: x = %.6f\n", iter, x);
            fflush(stdout);
            hpcckpt_delay_end();
            switch (hpcckpt_checkpoint()) {                             /* a checkpoint between iterations */
            case HPCCKPT_CHECKPOINTED: printf("checkpoint written\n"); break;
            case HPCCKPT_RESTARTED:    printf("restarted from the checkpoint of iteration %d\n", iter); break;
            case HPCCKPT_NOT_ENABLED:  break;                           /* run without hpcckpt */
            default: fprintf(stderr, "checkpoint failed: %s\n", hpcckpt_last_error());
            }
        }
    }
    return 0;
}
