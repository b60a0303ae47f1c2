/* hpcckpt program API for C, C++ and Fortran (ISO_C_BINDING): the same calls as Python's hpcckpt.aware.
 * Build the library with `python -m hpcckpt.aware.build DIR` (DIR/libhpcckpt_aware.so and this header), link
 * with -L DIR -lhpcckpt_aware. Every call is cheap when the program does not run under hpcckpt. */
#ifndef HPCCKPT_AWARE_H
#define HPCCKPT_AWARE_H
#ifdef __cplusplus
extern "C" {
#endif

#define HPCCKPT_CHECKPOINTED 1   /* hpcckpt_checkpoint(): this run took the checkpoint */
#define HPCCKPT_RESTARTED    2   /* hpcckpt_checkpoint(): resumed from it after a restart */
#define HPCCKPT_NOT_ENABLED  0   /* not running under dmtcp_launch / dmtcp_restart */
#define HPCCKPT_ERROR       -1   /* the agent refused or failed (see hpcckpt_last_error()) */

int hpcckpt_is_enabled(void);           /* 1 under hpcckpt, else 0 */
int hpcckpt_checkpoint(void);           /* checkpoint the whole computation now; blocks until complete */
int hpcckpt_delay_begin(void);          /* no checkpoint freezes this process until hpcckpt_delay_end() */
int hpcckpt_delay_end(void);            /* (nesting counts; 0 on success, HPCCKPT_ERROR on failure) */
const char *hpcckpt_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
