/* Descriptors kept open on /proc files of the program's own processes and threads, read again every step:
 *   maps   /proc/self/maps, read 200 bytes per step (the offset must survive); at the end of each pass the
 *          bytes read must equal a fresh read of /proc/self/maps (it is this process's maps, restored);
 *   status /proc/self/status: "Pid:" must be getpid();
 *   stat   /proc/<getpid()>/stat: first field getpid(), comm "(procfd)";
 *   tcomm  /proc/thread-self/comm opened by a second thread: its name, "procfd-thr"; the same thread's
 *          /proc/<tid>/comm opened by the main thread;
 *   ccomm  /proc/<child>/comm of a forked child (another process of the job): "procfd-child";
 *   dir    /proc/self as a directory fd: openat(dir, "comm") reads "procfd".
 * One line per step to OUT: "step i ok" or "step i BAD <what>". Usage: procfd OUT STEPS */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int tcomm = -1;
static pid_t thr_tid;

static void *thr(void *a) {
    (void)a;
    pthread_setname_np(pthread_self(), "procfd-thr");
    thr_tid = gettid();
    tcomm = open("/proc/thread-self/comm", O_RDONLY);
    for (;;) pause();
    return NULL;
}

static ssize_t slurp(int fd, char *buf, size_t n) {      /* from offset 0 */
    if (lseek(fd, 0, SEEK_SET) < 0) return -1;
    ssize_t got = 0, r;
    while ((size_t)got < n - 1 && (r = read(fd, buf + got, n - 1 - got)) > 0) got += r;
    buf[got < 0 ? 0 : got] = 0;
    return got;
}

static ssize_t whole(const char *path, char *buf, size_t n) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t r = slurp(fd, buf, n);
    close(fd);
    return r;
}

static void strip(char *s) { s[strcspn(s, "\n")] = 0; }

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    FILE *out = fopen(argv[1], "w");
    setvbuf(out, NULL, _IOLBF, 0);
    long steps = atol(argv[2]);
    prctl(PR_SET_NAME, "procfd");
    pid_t child = fork();
    if (child == 0) {
        prctl(PR_SET_NAME, "procfd-child");
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        for (;;) pause();
    }
    pthread_t t;
    pthread_create(&t, NULL, thr, NULL);
    while (__atomic_load_n(&tcomm, __ATOMIC_SEQ_CST) < 0) usleep(1000);
    char path[64];
    int maps = open("/proc/self/maps", O_RDONLY);
    int status = open("/proc/self/status", O_RDONLY);
    snprintf(path, sizeof path, "/proc/%d/stat", getpid());
    int st = open(path, O_RDONLY);
    snprintf(path, sizeof path, "/proc/%d/comm", child);
    int ccomm = open(path, O_RDONLY);
    snprintf(path, sizeof path, "/proc/%d/comm", thr_tid);    /* a thread by its TID, without /task/ */
    int tcomm2 = open(path, O_RDONLY);
    for (int w = 0; w < 5000; w++) {                     /* until the child has named itself */
        char name[64];
        if (slurp(ccomm, name, sizeof name) > 0 && !strcmp(name, "procfd-child\n")) break;
        usleep(1000);
    }
    int dir = open("/proc/self", O_RDONLY | O_DIRECTORY);
    static char acc[1 << 20], fresh[1 << 20], buf[8192];
    size_t used = 0;
    for (long i = 1; i <= steps; i++) {
        char bad[256] = "";
        ssize_t r = read(maps, acc + used, 200);
        if (r < 0) snprintf(bad, sizeof bad, "maps read failed");
        else if (r > 0) used += r;
        else {
            ssize_t n = whole("/proc/self/maps", fresh, sizeof fresh);
            if (n != (ssize_t)used || memcmp(acc, fresh, used)) {
                size_t k = 0;
                while (k < used && k < (size_t)n && acc[k] == fresh[k]) k++;
                snprintf(bad, sizeof bad, "maps through the fd differ at byte %zu of %zu/%zd", k, used, n);
                char name[4096];                          /* both versions next to OUT, to look at */
                snprintf(name, sizeof name, "%s.maps-fd", argv[1]);
                FILE *f = fopen(name, "w");
                if (f) { fwrite(acc, 1, used, f); fclose(f); }
                snprintf(name, sizeof name, "%s.maps-now", argv[1]);
                if ((f = fopen(name, "w"))) { fwrite(fresh, 1, n, f); fclose(f); }
            }
            used = 0;
            lseek(maps, 0, SEEK_SET);
        }
        char want[64];
        slurp(status, buf, sizeof buf);
        snprintf(want, sizeof want, "\nPid:\t%d\n", getpid());
        if (!strstr(buf, want)) snprintf(bad, sizeof bad, "status fd is not mine (%.60s)", buf);
        slurp(st, buf, sizeof buf);
        snprintf(want, sizeof want, "%d (procfd) ", getpid());
        if (strncmp(buf, want, strlen(want))) snprintf(bad, sizeof bad, "stat fd: %.40s", buf);
        slurp(tcomm, buf, sizeof buf);
        strip(buf);
        if (strcmp(buf, "procfd-thr")) snprintf(bad, sizeof bad, "thread comm fd: '%.40s'", buf);
        slurp(tcomm2, buf, sizeof buf);
        strip(buf);
        if (strcmp(buf, "procfd-thr")) snprintf(bad, sizeof bad, "/proc/<tid>/comm fd: '%.40s'", buf);
        slurp(ccomm, buf, sizeof buf);
        strip(buf);
        if (strcmp(buf, "procfd-child")) snprintf(bad, sizeof bad, "child comm fd: '%.40s'", buf);
        int c = openat(dir, "comm", O_RDONLY);
        if (c < 0) snprintf(bad, sizeof bad, "openat(/proc/self fd, comm) failed");
        else {
            slurp(c, buf, sizeof buf);
            close(c);
            strip(buf);
            if (strcmp(buf, "procfd")) snprintf(bad, sizeof bad, "dir fd comm: '%.40s'", buf);
        }
        if (bad[0]) fprintf(out, "step %ld BAD %s\n", i, bad);
        else fprintf(out, "step %ld ok\n", i);
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, NULL);
    }
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    fprintf(out, "done\n");
    return 0;
}
