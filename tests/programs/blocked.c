/* Spends its time blocked in one kind of system call, so a checkpoint almost always lands inside it; after a
 * restart the call must be re-issued the way the kernel would have restarted it: the program never sees
 * EINTR or a kernel-internal restart code. No signal handlers are installed, so any EINTR is a bug of ours.
 * Usage: blocked MODE OUT N. Modes: nanosleep, abstime (clock_nanosleep TIMER_ABSTIME), read, poll, select,
 * futex (sem_wait, posted by a thread every 200 ms), condwait (pthread_cond_timedwait), epoll,
 * sigsuspend (SIGUSR1 blocked except inside sigsuspend; a thread sends it every 200 ms; after each return the
 * mask must again block SIGUSR1 - the restart must not leave the temporary mask behind).
 * read/poll/select/epoll wait for a line on stdin. One line per completed call: "MODE i ok" or "MODE i FAIL ..". */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

static sem_t sem;
static void *poster(void *a) { (void)a; for (;;) { usleep(200000); sem_post(&sem); } return NULL; }
static void on_usr1(int s) { (void)s; }
static void *usr1_sender(void *a) { (void)a; for (;;) { usleep(200000); kill(getpid(), SIGUSR1); } return NULL; }

static int read_line(void) {
    char buf[256];
    ssize_t n = read(0, buf, sizeof buf);
    return n > 0 ? 0 : (n == 0 ? -2 : -1);
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    const char *mode = argv[1];
    FILE *f = fopen(argv[2], "w");
    long n = atol(argv[3]);
    setvbuf(f, NULL, _IOLBF, 0);
    int ep = -1;
    if (!strcmp(mode, "epoll")) {
        ep = epoll_create1(0);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = 0};
        epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    }
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    if (!strcmp(mode, "sigsuspend")) {
        signal(SIGUSR1, on_usr1);
        sigset_t b; sigemptyset(&b); sigaddset(&b, SIGUSR1);
        pthread_sigmask(SIG_BLOCK, &b, NULL);
        pthread_t t;
        pthread_create(&t, NULL, usr1_sender, NULL);
    }
    if (!strcmp(mode, "futex")) {
        sem_init(&sem, 0, 0);
        pthread_t t;
        pthread_create(&t, NULL, poster, NULL);
    }
    for (long i = 1; i <= n; i++) {
        int r = 0;
        errno = 0;
        if (!strcmp(mode, "nanosleep")) {
            struct timespec ts = {0, 200000000};
            r = nanosleep(&ts, NULL);
        } else if (!strcmp(mode, "abstime")) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_nsec += 200000000;
            if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
            r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            if (r) { errno = r; r = -1; }
        } else if (!strcmp(mode, "read")) {
            r = read_line();
        } else if (!strcmp(mode, "poll")) {
            struct pollfd p = {.fd = 0, .events = POLLIN};
            r = poll(&p, 1, 10000);
            r = r == 1 ? read_line() : (r == 0 ? -3 : -1);
        } else if (!strcmp(mode, "select")) {
            fd_set s; FD_ZERO(&s); FD_SET(0, &s);
            struct timeval tv = {10, 0};
            r = select(1, &s, NULL, NULL, &tv);
            r = r == 1 ? read_line() : (r == 0 ? -3 : -1);
        } else if (!strcmp(mode, "epoll")) {
            struct epoll_event out;
            r = epoll_wait(ep, &out, 1, 10000);
            r = r == 1 ? read_line() : (r == 0 ? -3 : -1);
        } else if (!strcmp(mode, "futex")) {
            r = sem_wait(&sem);
        } else if (!strcmp(mode, "condwait")) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 200000000;
            if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
            pthread_mutex_lock(&mu);
            r = pthread_cond_timedwait(&cv, &mu, &ts);
            pthread_mutex_unlock(&mu);
            r = (r == ETIMEDOUT) ? 0 : (errno = r, -1);
        } else if (!strcmp(mode, "sigsuspend")) {
            sigset_t empty, cur; sigemptyset(&empty);
            r = sigsuspend(&empty);                     /* returns -1/EINTR after the handler ran: expected */
            pthread_sigmask(SIG_BLOCK, NULL, &cur);
            r = (r == -1 && errno == EINTR && sigismember(&cur, SIGUSR1)) ? 0 : (errno = EINVAL, -1);
        } else return 2;
        if (r == 0) fprintf(f, "%s %ld ok\n", mode, i);
        else fprintf(f, "%s %ld FAIL r=%d errno=%d (%s)\n", mode, i, r, errno, strerror(errno));
    }
    return 0;
}
