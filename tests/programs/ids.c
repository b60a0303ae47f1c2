/* Identity checks across a restart. Main + 2 threads remember their PID/TIDs at start, write a pid file, and
 * every tick check, and write to argv[1] one line "tick N <status>", where status is the list of checks
 * that failed ("ok" if none):
 *   pid      getpid() still the PID of the start (and the pid file's content)
 *   tid      each thread's gettid() still its TID of the start
 *   proc     /proc/self/stat shows our own PID (a private /proc of our PID namespace)
 *   kill     pthread_kill(thread, SIGUSR1) reaches that very thread (glibc uses its cached TID)
 *   raise    raise(SIGUSR2) reaches the calling thread
 *   robust   an error-checking mutex locked in a thread can be unlocked by it (owner TID check)
 * argv[2] = ticks (default 100000), argv[3] = tick length in microseconds (default 20000).
 * With argv[4] = "relaxed" the pid/tid/proc checks are skipped (for restarts without a PID namespace). */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static pid_t start_pid, start_tid[3];
static pthread_t th[3];
static volatile pid_t usr1_tid[3], usr2_tid;
static __thread int my_index;
static pthread_mutex_t emu;

static void on_usr1(int s) { (void)s; usr1_tid[my_index] = (pid_t)syscall(SYS_gettid); }
static void on_usr2(int s) { (void)s; usr2_tid = (pid_t)syscall(SYS_gettid); }

static void *worker(void *arg) {
    my_index = (int)(long)arg;
    start_tid[my_index] = (pid_t)syscall(SYS_gettid);
    for (;;) pause();
    return NULL;
}

int main(int argc, char **argv) {
    const char *out = argc > 1 ? argv[1] : "ids.out";
    long ticks = argc > 2 ? atol(argv[2]) : 100000;
    long usec = argc > 3 ? atol(argv[3]) : 20000;
    int relaxed = argc > 4 && strcmp(argv[4], "relaxed") == 0;
    FILE *f = fopen(out, "w");
    if (!f) return 4;
    setvbuf(f, NULL, _IOLBF, 0);
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
    pthread_mutex_init(&emu, &a);
    start_pid = getpid();
    start_tid[0] = (pid_t)syscall(SYS_gettid);
    th[0] = pthread_self();
    for (long i = 1; i <= 2; i++) pthread_create(&th[i], NULL, worker, (void *)i);
    while (!start_tid[1] || !start_tid[2]) usleep(1000);
    char pidfile[4096];
    snprintf(pidfile, sizeof pidfile, "%s.pid", out);
    FILE *pf = fopen(pidfile, "w");
    fprintf(pf, "%d\n", start_pid);
    fclose(pf);
    for (long t = 1; t <= ticks; t++) {
        char bad[256] = "";
        if (!relaxed) {
            int filepid = 0;
            pf = fopen(pidfile, "r");
            if (!pf || fscanf(pf, "%d", &filepid) != 1) filepid = -1;
            if (pf) fclose(pf);
            if (getpid() != start_pid || filepid != start_pid) strcat(bad, " pid");
            if ((pid_t)syscall(SYS_gettid) != start_tid[0]) strcat(bad, " tid");
            char buf[64] = "";
            FILE *st = fopen("/proc/self/stat", "r");
            if (!st || !fgets(buf, sizeof buf, st) || atoi(buf) != getpid()) strcat(bad, " proc");
            if (st) fclose(st);
        }
        for (int i = 1; i <= 2; i++) {
            usr1_tid[i] = 0;
            if (pthread_kill(th[i], SIGUSR1) != 0) { strcat(bad, " kill"); continue; }
            for (int w = 0; w < 1000 && !usr1_tid[i]; w++) usleep(100);
            if (!usr1_tid[i] || (!relaxed && usr1_tid[i] != start_tid[i])) strcat(bad, " kill");
        }
        usr2_tid = 0;
        raise(SIGUSR2);
        if (usr2_tid != (pid_t)syscall(SYS_gettid)) strcat(bad, " raise");
        if (pthread_mutex_lock(&emu) != 0 || pthread_mutex_unlock(&emu) != 0) strcat(bad, " robust");
        fprintf(f, "tick %ld %s\n", t, bad[0] ? bad + 1 : "ok");
        usleep(usec);
    }
    return 0;
}
