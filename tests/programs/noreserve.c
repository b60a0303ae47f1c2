/* Address-space reservations the way Go, Java, sanitizers and many allocators make them, plus two threads
 * blocked in calls a checkpoint interrupts (epoll_wait, semop).
 *   R: 2 TiB MAP_NORESERVE read-write, a few pages used far apart;
 *   G: 64 GiB PROT_NONE reservation (Go's arena style), with 4 MiB made read-write inside it by MAP_FIXED and a
 *      PROT_NONE guard page in the middle of those 4 MiB.
 * Every step checks the pages written by the previous step, that R still has the "nr" VmFlag, that G's parts
 * keep their protections (maps), and writes the step into them; the threads are woken once per step.
 * One line per step to OUT: "step i ok <sum>" or "step i BAD <what>" (exit 3 on EINTR or ENOMEM).
 * Usage: noreserve OUT STEPS SEMKEY */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/sem.h>
#include <time.h>
#include <unistd.h>

#define TIB (1ULL << 40)
#define GIB (1ULL << 30)
#define PG 4096ULL

static FILE *out;
static int semid, ep, pfd[2];
static volatile long woken[2];

static void die(const char *what, int err) {
    fprintf(out, "%s failed: %s\n", what, strerror(err));
    fflush(out);
    _exit(3);
}

static void *sem_waiter(void *a) {
    (void)a;
    for (;;) {
        struct sembuf op = {0, -1, 0};
        if (semop(semid, &op, 1) < 0) {
            if (errno == EIDRM) return NULL;       /* main removed it at the end */
            die("semop", errno);
        }
        __atomic_add_fetch(&woken[0], 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

static void *epoll_waiter(void *a) {
    (void)a;
    for (;;) {
        struct epoll_event ev;
        int n = epoll_wait(ep, &ev, 1, -1);
        if (n < 0) die("epoll_wait", errno);
        char c;
        if (read(pfd[0], &c, 1) != 1) die("read", errno);
        __atomic_add_fetch(&woken[1], 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

/* the maps line of the mapping holding addr: its perms, and whether smaps shows the "nr" flag */
static int look(uintptr_t addr, char perms[5], int *nr) {
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    int in = 0, found = 0;
    *nr = 0;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long s, e;
        char p[5];
        if (sscanf(line, "%lx-%lx %4s", &s, &e, p) == 3 && strchr(line, ' ') && line[0] != 'V') {
            in = addr >= s && addr < e;
            if (in) { memcpy(perms, p, 5); found = 1; }
        } else if (in && !strncmp(line, "VmFlags:", 8)) {
            *nr = strstr(line, " nr") != NULL;
        }
    }
    if (f) fclose(f);
    return found;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    out = fopen(argv[1], "w");
    setvbuf(out, NULL, _IOLBF, 0);
    long steps = atol(argv[2]);
    key_t key = (key_t)strtol(argv[3], NULL, 0);

    char *R = mmap(NULL, 2 * TIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (R == MAP_FAILED) die("mmap 2 TiB MAP_NORESERVE", errno);
    char *G = mmap(NULL, 64 * GIB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (G == MAP_FAILED) die("mmap 64 GiB PROT_NONE", errno);
    char *A = G + 8 * GIB;                                   /* the arena inside the reservation */
    if (mmap(A, 4 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != A)
        die("mmap arena", errno);
    char *guard = A + (2 << 20);
    if (mprotect(guard, PG, PROT_NONE)) die("mprotect guard", errno);
    char *rpages[] = {R, R + GIB + 5 * PG, R + TIB, R + 2 * TIB - PG};
    char *apages[] = {A, guard - PG, guard + PG, A + (4 << 20) - PG};

    semid = semget(key, 1, IPC_CREAT | 0600);
    if (semid < 0) die("semget", errno);
    semctl(semid, 0, SETVAL, 0);
    if (pipe(pfd)) die("pipe", errno);
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = pfd[0]};
    epoll_ctl(ep, EPOLL_CTL_ADD, pfd[0], &ev);
    pthread_t t;
    pthread_create(&t, NULL, sem_waiter, NULL);
    pthread_create(&t, NULL, epoll_waiter, NULL);

    for (long i = 1; i <= steps; i++) {
        char bad[200] = "";
        unsigned long sum = 0;
        for (int k = 0; k < 4; k++) {
            long *r = (long *)rpages[k], *a = (long *)apages[k];
            if (i > 1 && (r[0] != (i - 1) * 10 + k || r[PG / 8 - 1] != ~r[0])) snprintf(bad, sizeof bad, "R page %d: %ld", k, r[0]);
            if (i > 1 && a[0] != (i - 1) * 100 + k) snprintf(bad, sizeof bad, "arena page %d: %ld", k, a[0]);
            r[0] = i * 10 + k;
            r[PG / 8 - 1] = ~r[0];
            a[0] = i * 100 + k;
            sum += r[0] + a[0];
        }
        char perms[5];
        int nr;
        if (!look((uintptr_t)R + TIB, perms, &nr) || strcmp(perms, "rw-p") || !nr)
            snprintf(bad, sizeof bad, "2 TiB reservation: %s nr=%d", perms, nr);
        if (!look((uintptr_t)guard, perms, &nr) || strcmp(perms, "---p"))
            snprintf(bad, sizeof bad, "guard page is %s", perms);
        if (!look((uintptr_t)G + GIB, perms, &nr) || strcmp(perms, "---p"))
            snprintf(bad, sizeof bad, "reservation is %s", perms);
        if (!look((uintptr_t)A, perms, &nr) || strcmp(perms, "rw-p"))
            snprintf(bad, sizeof bad, "arena is %s", perms);
        struct sembuf op = {0, 1, 0};
        if (semop(semid, &op, 1)) die("main semop", errno);
        if (write(pfd[1], "x", 1) != 1) die("write", errno);
        struct timespec ts = {0, 50000000};
        while (nanosleep(&ts, &ts) < 0)
            die("nanosleep", errno);
        for (int w = 0; w < 10000 && (woken[0] != i || woken[1] != i); w++)
            usleep(1000);                            /* a loaded machine: give the threads time */
        if (woken[0] != i || woken[1] != i)
            snprintf(bad, sizeof bad, "threads woken %ld/%ld times", woken[0], woken[1]);
        if (bad[0]) fprintf(out, "step %ld BAD %s\n", i, bad);
        else fprintf(out, "step %ld ok %lu\n", i, sum);
    }
    semctl(semid, 0, IPC_RMID);
    fprintf(out, "done\n");
    return 0;
}
