/* Per-process state a program notices, checked every tick and written to argv[1] as one line:
 *   static part (must be the same before and after a restart): signal mask, a pending (blocked) SIGUSR2,
 *   sigaltstack, RLIMIT_NOFILE/RLIMIT_CORE, umask, cwd, personality, thread name, SIGTERM ignored;
 *   counters (must keep increasing after a restart): ITIMER_REAL/SIGALRM ticks, a POSIX timer's signals
 *   (with its sigval), SIGUSR1 handled on the alternate stack, heap growth with sbrk.
 * After argv[2] ticks it unblocks SIGUSR2: the signal pending since the start must be delivered. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile int alarms, ptimer, usr1_onstack, usr2, bad_sigval;
static char altstack[1 << 16];

static void on_alrm(int s) { (void)s; alarms++; }
static void on_rt(int s, siginfo_t *si, void *c) { (void)s; (void)c; if (si->si_value.sival_int == 1234) ptimer++; else bad_sigval++; }
static void on_usr1(int s) {
    (void)s;
    stack_t cur;
    sigaltstack(NULL, &cur);
    if (cur.ss_flags & SS_ONSTACK) usr1_onstack++;
}
static void on_usr2(int s) { (void)s; usr2++; }

int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "w");
    long ticks = argc > 2 ? atol(argv[2]) : 100;
    setvbuf(f, NULL, _IOLBF, 0);
    struct sigaction sa = {0};
    sa.sa_handler = on_alrm; sa.sa_flags = SA_RESTART; sigaction(SIGALRM, &sa, NULL);
    sa.sa_handler = on_usr1; sa.sa_flags = SA_RESTART | SA_ONSTACK; sigaddset(&sa.sa_mask, SIGALRM);
    sigaction(SIGUSR1, &sa, NULL);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_usr2; sa.sa_flags = 0; sigaction(SIGUSR2, &sa, NULL);
    sa.sa_sigaction = on_rt; sa.sa_flags = SA_SIGINFO | SA_RESTART; sigaction(SIGRTMIN + 1, &sa, NULL);
    signal(SIGTERM, SIG_IGN);
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    sigset_t m; sigemptyset(&m); sigaddset(&m, SIGUSR2); sigaddset(&m, SIGHUP);
    sigprocmask(SIG_BLOCK, &m, NULL);
    raise(SIGUSR2);                                        /* stays pending while blocked */
    struct itimerval it = {{0, 100000}, {0, 100000}};
    setitimer(ITIMER_REAL, &it, NULL);
    timer_t tid;
    struct sigevent se = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGRTMIN + 1};
    se.sigev_value.sival_int = 1234;
    timer_create(CLOCK_MONOTONIC, &se, &tid);
    struct itimerspec its = {{0, 50000000}, {0, 50000000}};
    timer_settime(tid, 0, &its, NULL);
    struct rlimit rl = {200, 4096};
    setrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = 0; rl.rlim_max = 0;
    setrlimit(RLIMIT_CORE, &rl);
    umask(027);
    mkdir("statedir", 0755);
    chdir("statedir");
    personality(PER_LINUX | ADDR_NO_RANDOMIZE);
    prctl(PR_SET_NAME, "statecheck");
    char *heap_start = sbrk(0);
    for (long t = 1; t <= ticks; t++) {
        if (t == ticks) sigprocmask(SIG_UNBLOCK, &m, NULL);
        raise(SIGUSR1);
        char *p = sbrk(4096);                              /* the heap keeps growing */
        memset(p, (int)t, 4096);
        int brk_ok = (p != (void *)-1) && ((char *)sbrk(0) - heap_start) == 4096 * t;
        sigset_t cur, pend;
        sigprocmask(SIG_BLOCK, NULL, &cur);
        sigpending(&pend);
        stack_t q; sigaltstack(NULL, &q);
        getrlimit(RLIMIT_NOFILE, &rl);
        struct rlimit core; getrlimit(RLIMIT_CORE, &core);
        mode_t um = umask(027);
        char cwd[512]; getcwd(cwd, sizeof cwd);
        char name[32] = ""; prctl(PR_GET_NAME, name);
        struct sigaction term; sigaction(SIGTERM, NULL, &term);
        fprintf(f, "tick %ld | mask=%d%d pending=%d alt=%s/%zu nofile=%ld/%ld core=%ld umask=%03o cwd=%s pers=%x "
                "comm=%s term=%s | alarms=%d ptimer=%d badval=%d usr1=%d brk=%d usr2=%d\n",
                t, sigismember(&cur, SIGUSR2), sigismember(&cur, SIGHUP), sigismember(&pend, SIGUSR2),
                q.ss_sp == altstack ? "ours" : "other", q.ss_size, (long)rl.rlim_cur, (long)rl.rlim_max,
                (long)core.rlim_cur, um, strrchr(cwd, '/'), personality(0xffffffff), name,
                term.sa_handler == SIG_IGN ? "ign" : "other", alarms, ptimer, bad_sigval, usr1_onstack, brk_ok, usr2);
        usleep(50000);
    }
    return 0;
}
