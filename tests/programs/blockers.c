/* One thread blocked in each kind of blocking system call, all at once, so a checkpoint always lands inside
 * every one of them. No signal handler is installed anywhere: a call that returns EINTR was interrupted by the
 * checkpoint itself, which a transparent checkpoint must never let the program see (exit 3, like a program
 * that does not retry).
 * Usage: blockers OUT TICKS [SEMKEY]. Every tick the main thread sleeps 60 ms (the others block meanwhile),
 * then wakes each blocker once (semop +1, a byte down a pipe or socket, FUTEX_WAKE, a connect, a signal, a
 * child's exit); the sleepers just sleep 100 ms. It waits for all of them and writes one line per tick whose
 * contents depend only on the tick: the output of a run with checkpoints must equal a plain run's.
 * Calls: semop, epoll_wait, poll, select, read (pipe), futex(FUTEX_WAIT), nanosleep, clock_nanosleep,
 * accept (unix listener), recv (SO_RCVTIMEO set: the kind that fails with EINTR on a stop), waitpid,
 * sigtimedwait. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ipc.h>
#include <sys/select.h>
#include <sys/sem.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { SEMOP, EPOLL, POLL, SELECT, READ, FUTEX, NANOSLEEP, CLOCKSLEEP, ACCEPT, RECV, WAITPID, SIGWAIT, NB };
static const char *names[NB] = {"semop", "epoll_wait", "poll", "select", "read", "futex", "nanosleep",
                                "clock_nanosleep", "accept", "recv", "waitpid", "sigtimedwait"};

static FILE *out;
static long ticks;
static int semid, ep, pfd[4][2], childpipe[2], lsock, sv[2];
static struct sockaddr_un addr;
static socklen_t addrlen;
static volatile uint32_t futex_word;
static pid_t tids[NB];
static long results[NB];
static int done;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static void die(int rc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(out, fmt, ap);
    va_end(ap);
    fputc('\n', out);
    fflush(out);
    _exit(rc);
}

/* a failed call: EINTR is the bug this program looks for */
static void failed(int which, long tick, int err) {
    if (err == EINTR)
        die(3, "%s failed: Interrupted system call (tick %ld)", names[which], tick);
    die(4, "%s failed: %s (tick %ld)", names[which], strerror(err), tick);
}

static void report(int which, long value) {
    pthread_mutex_lock(&mu);
    results[which] = value;
    done++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static long one_byte(int which, int fd, long tick) {
    char c;
    ssize_t n = read(fd, &c, 1);
    if (n != 1)
        failed(which, tick, n < 0 ? errno : EPIPE);
    return c;
}

static void *blocker(void *arg) {
    int which = (int)(intptr_t)arg;
    tids[which] = (pid_t)syscall(SYS_gettid);
    for (long t = 1; t <= ticks; t++) {
        long v = 0;
        switch (which) {
        case SEMOP: {
            struct sembuf op = {0, -1, 0};
            if (semop(semid, &op, 1) < 0) failed(which, t, errno);
            v = semctl(semid, 0, GETVAL);
            break;
        }
        case EPOLL: {
            struct epoll_event ev;
            int n = epoll_wait(ep, &ev, 1, -1);
            if (n != 1) failed(which, t, n < 0 ? errno : EAGAIN);
            v = one_byte(which, ev.data.fd, t);
            break;
        }
        case POLL: {
            struct pollfd p = {.fd = pfd[1][0], .events = POLLIN};
            int n = poll(&p, 1, -1);
            if (n != 1) failed(which, t, n < 0 ? errno : EAGAIN);
            v = one_byte(which, pfd[1][0], t);
            break;
        }
        case SELECT: {
            fd_set s;
            FD_ZERO(&s);
            FD_SET(pfd[2][0], &s);
            int n = select(pfd[2][0] + 1, &s, NULL, NULL, NULL);
            if (n != 1) failed(which, t, n < 0 ? errno : EAGAIN);
            v = one_byte(which, pfd[2][0], t);
            break;
        }
        case READ:
            v = one_byte(which, pfd[3][0], t);
            break;
        case FUTEX:
            while (futex_word < (uint32_t)t) {
                long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, (uint32_t)(t - 1), NULL, NULL, 0);
                if (r < 0 && errno != EAGAIN) failed(which, t, errno);
            }
            v = futex_word;
            break;
        case NANOSLEEP: {
            struct timespec ts = {0, 100000000};
            if (nanosleep(&ts, NULL) < 0) failed(which, t, errno);
            break;
        }
        case CLOCKSLEEP: {
            struct timespec ts = {0, 100000000};
            int r = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
            if (r) failed(which, t, r);
            break;
        }
        case ACCEPT: {
            int c = accept(lsock, NULL, NULL);
            if (c < 0) failed(which, t, errno);
            v = one_byte(which, c, t);
            close(c);
            break;
        }
        case RECV: {
            char c;
            ssize_t n = recv(sv[0], &c, 1, 0);
            if (n != 1) failed(which, t, n < 0 ? errno : EPIPE);
            v = c;
            break;
        }
        case WAITPID: {
            pid_t child = fork();
            if (child < 0) failed(which, t, errno);
            if (child == 0) {
                char c;
                _exit(read(childpipe[0], &c, 1) == 1 ? c : 99);
            }
            int st;
            if (waitpid(child, &st, 0) != child) failed(which, t, errno);
            v = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
            break;
        }
        case SIGWAIT: {
            sigset_t s;
            sigemptyset(&s);
            sigaddset(&s, SIGUSR1);
            struct timespec ts = {30, 0};
            siginfo_t si;
            int sig = sigtimedwait(&s, &si, &ts);
            if (sig < 0) failed(which, t, errno);
            v = si.si_value.sival_int;
            break;
        }
        }
        report(which, v);
        /* the next call must not start before the main thread has collected this tick */
        pthread_mutex_lock(&mu);
        while (done != 0)
            pthread_cond_wait(&cv, &mu);
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

static void put(int fd, char c) {
    if (write(fd, &c, 1) != 1) die(4, "main: write: %s", strerror(errno));
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    out = fopen(argv[1], "w");
    if (!out) return 2;
    setvbuf(out, NULL, _IOLBF, 0);
    ticks = atol(argv[2]);
    key_t key = argc > 3 ? (key_t)strtol(argv[3], NULL, 0) : IPC_PRIVATE;
    semid = semget(key, 1, IPC_CREAT | 0600);
    if (semid < 0) die(4, "semget: %s", strerror(errno));
    semctl(semid, 0, SETVAL, 0);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &s, NULL);     /* inherited by every thread: only sigtimedwait takes it */
    for (int i = 0; i < 4; i++)
        if (pipe(pfd[i])) die(4, "pipe: %s", strerror(errno));
    if (pipe(childpipe) || socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) die(4, "pipe: %s", strerror(errno));
    struct timeval tv = {30, 0};
    setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = pfd[0][0]};
    epoll_ctl(ep, EPOLL_CTL_ADD, pfd[0][0], &ev);
    lsock = socket(AF_UNIX, SOCK_STREAM, 0);
    addr.sun_family = AF_UNIX;
    int len = snprintf(addr.sun_path + 1, sizeof addr.sun_path - 1, "blockers-%d", getpid());
    addrlen = offsetof(struct sockaddr_un, sun_path) + 1 + len;
    if (bind(lsock, (struct sockaddr *)&addr, addrlen) || listen(lsock, 4)) die(4, "listen: %s", strerror(errno));

    pthread_t th[NB];
    for (int i = 0; i < NB; i++)
        pthread_create(&th[i], NULL, blocker, (void *)(intptr_t)i);
    for (long t = 1; t <= ticks; t++) {
        struct timespec ts = {0, 60000000};
        while (nanosleep(&ts, &ts) < 0)
            if (errno != EINTR) die(4, "main: nanosleep: %s", strerror(errno));
            else die(3, "main: nanosleep failed: Interrupted system call");
        char c = 'a' + t % 26;
        struct sembuf op = {0, 1, 0};
        if (semop(semid, &op, 1)) die(4, "main: semop: %s", strerror(errno));
        put(pfd[0][1], c);
        put(pfd[1][1], c);
        put(pfd[2][1], c);
        put(pfd[3][1], c);
        futex_word = (uint32_t)t;
        syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        int cs = socket(AF_UNIX, SOCK_STREAM, 0);
        if (connect(cs, (struct sockaddr *)&addr, addrlen)) die(4, "main: connect: %s", strerror(errno));
        put(cs, c);
        put(sv[1], c);
        put(childpipe[1], (char)(t % 100));
        while (!tids[SIGWAIT]) usleep(1000);
        union sigval val = {.sival_int = (int)t};
        siginfo_t si;
        memset(&si, 0, sizeof si);
        si.si_signo = SIGUSR1;
        si.si_code = SI_QUEUE;
        si.si_pid = getpid();
        si.si_uid = getuid();
        si.si_value = val;
        if (syscall(SYS_rt_tgsigqueueinfo, getpid(), tids[SIGWAIT], SIGUSR1, &si))
            die(4, "main: rt_tgsigqueueinfo: %s", strerror(errno));
        pthread_mutex_lock(&mu);
        while (done < NB)
            if ((errno = pthread_cond_wait(&cv, &mu))) die(4, "main: cond_wait: %s", strerror(errno));
        fprintf(out, "tick %ld:", t);
        for (int i = 0; i < NB; i++)
            fprintf(out, " %s=%ld", names[i], results[i]);
        fputc('\n', out);
        done = 0;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
        close(cs);
    }
    for (int i = 0; i < NB; i++)
        pthread_join(th[i], NULL);
    semctl(semid, 0, IPC_RMID);
    fprintf(out, "done\n");
    return 0;
}
