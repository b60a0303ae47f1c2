/* File locks held across a checkpoint, checked every round by the processes themselves.
 * argv[1] output, argv[2] a directory, argv[3] rounds. In argv[2]:
 *   a.lock  flock(LOCK_EX) by the parent, on a description the child shares (inherited)
 *   data    parent's POSIX locks: WRITE bytes 0-99, READ 200-999; OFD WRITE lock 1000-1099 on a second
 *           description; the parent takes and drops POSIX 3000-3099 and OFD 2000-2099 every round
 *   b.lock  flock taken and dropped by the parent every round
 *   c.lock  child's POSIX WRITE lock on bytes 0-9 (held), 20-29 taken and dropped every round
 *   the directory itself: flock(LOCK_SH) by the parent
 * Each round the child checks from its own descriptions that the parent's locks are held by the parent (F_GETLK
 * names it), the OFD lock by a description (pid -1), the flock conflicts; the parent checks the child's lock.
 * One line per round: "round r ok" or "round r BAD <code>". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

static int openat_dir(const char *dir, const char *name) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return open(p, O_RDWR | O_CREAT, 0644);
}

static int setlk(int fd, int cmd, short type, off_t start, off_t len) {
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    return fcntl(fd, cmd, &fl);
}

static struct flock getlk(int fd, int cmd, short type, off_t start, off_t len) {
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    if (fcntl(fd, cmd, &fl) != 0) fl.l_type = -1;
    return fl;
}

static int child_checks(const char *dir, int fc, int fcc) {
    int fa2 = openat_dir(dir, "a.lock");
    int code = 0;
    if (flock(fa2, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK) code = 1;
    close(fa2);
    struct flock fl = getlk(fc, F_GETLK, F_WRLCK, 0, 100);
    if (!code && (fl.l_type != F_WRLCK || fl.l_pid != getppid())) code = 2;
    fl = getlk(fc, F_GETLK, F_WRLCK, 200, 100);
    if (!code && (fl.l_type != F_RDLCK || fl.l_pid != getppid())) code = 3;
    fl = getlk(fc, F_GETLK, F_RDLCK, 250, 10);
    if (!code && fl.l_type != F_UNLCK) code = 4;
    fl = getlk(fc, F_OFD_GETLK, F_WRLCK, 1000, 100);
    if (!code && (fl.l_type != F_WRLCK || fl.l_pid != -1)) code = 5;
    if (!code && (setlk(fc, F_SETLK, F_WRLCK, 150, 10) != 0 || setlk(fc, F_SETLK, F_UNLCK, 150, 10) != 0)) code = 6;
    if (!code && (setlk(fcc, F_SETLK, F_WRLCK, 20, 10) != 0 || setlk(fcc, F_SETLK, F_UNLCK, 20, 10) != 0)) code = 7;
    return code;
}

int main(int argc, char **argv) {
    FILE *out = fopen(argv[1], "a");
    const char *dir = argv[2];
    long rounds = atol(argv[3]);
    setvbuf(out, NULL, _IOLBF, 0);
    int fa = openat_dir(dir, "a.lock"), fd = openat_dir(dir, "data"), fb = openat_dir(dir, "b.lock");
    int fo = openat_dir(dir, "data");
    int fdir = open(dir, O_RDONLY | O_DIRECTORY);
    if (ftruncate(fd, 8192) != 0) return 1;
    if (flock(fa, LOCK_EX) || flock(fdir, LOCK_SH) || setlk(fd, F_SETLK, F_WRLCK, 0, 100) ||
        setlk(fd, F_SETLK, F_RDLCK, 200, 800) || setlk(fo, F_OFD_SETLK, F_WRLCK, 1000, 100)) {
        perror("lock");
        return 1;
    }
    int p2c[2], c2p[2];
    if (pipe(p2c) || pipe(c2p)) return 1;
    pid_t c = fork();
    if (c == 0) {
        int fc = openat_dir(dir, "data"), fcc = openat_dir(dir, "c.lock");
        unsigned char ready = 0;
        if (setlk(fcc, F_SETLK, F_WRLCK, 0, 10) || write(c2p[1], &ready, 1) != 1) _exit(2);
        for (;;) {
            unsigned char b;
            if (read(p2c[0], &b, 1) != 1 || b == 0xff) _exit(0);
            unsigned char code = (unsigned char)child_checks(dir, fc, fcc);
            if (write(c2p[1], &code, 1) != 1) _exit(3);
        }
    }
    int fcl = openat_dir(dir, "c.lock");
    unsigned char ready;
    if (read(c2p[0], &ready, 1) != 1) return 1;      /* the child holds its lock */
    for (long r = 1; r <= rounds; r++) {
        int code = 0;
        if (flock(fb, LOCK_EX | LOCK_NB) || flock(fb, LOCK_UN)) code = 11;
        if (!code && (setlk(fd, F_SETLK, F_WRLCK, 3000, 100) || setlk(fd, F_SETLK, F_UNLCK, 3000, 100))) code = 12;
        if (!code && (setlk(fo, F_OFD_SETLK, F_WRLCK, 2000, 100) || setlk(fo, F_OFD_SETLK, F_UNLCK, 2000, 100)))
            code = 13;
        struct flock fl = getlk(fcl, F_GETLK, F_RDLCK, 0, 10);
        if (!code && (fl.l_type != F_WRLCK || fl.l_pid != c)) code = 14;
        unsigned char b = (unsigned char)(r & 0x7f), answer = 0;
        if (write(p2c[1], &b, 1) != 1 || read(c2p[0], &answer, 1) != 1) code = 15;
        if (!code) code = answer;
        if (code) fprintf(out, "round %ld BAD %d\n", r, code);
        else fprintf(out, "round %ld ok\n", r);
        usleep(5000);
    }
    unsigned char end = 0xff;
    if (write(p2c[1], &end, 1) != 1) return 1;
    waitpid(c, NULL, 0);
    fprintf(out, "done\n");
    return 0;
}
