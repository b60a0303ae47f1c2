/* A program that checkpoints itself (application-level mode, tests/test_applevel.py).
 *
 *   appckpt OUT STATE STEPS [--restart]
 *
 * Each step appends one line to OUT (a value that depends on every earlier step) and sleeps 40 ms. On SIGUSR1
 * it writes its state (step, value, OUT's length, and 256 KiB of payload derived from the value) to STATE at
 * the next step boundary, in place and slowly: half, a 300 ms pause, the rest - a reader that does not wait
 * for the file to settle records a torn state. With APPCKPT_CHURN=1 it never stops rewriting STATE after the
 * first request. --restart reads STATE back (checking the payload), truncates OUT to the recorded length and
 * carries on.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PAYLOAD (256 * 1024)

static volatile sig_atomic_t asked;
static void on_usr1(int sig) { (void)sig; asked = 1; }

struct state { uint64_t step, value, out_len; };

static void fill(unsigned char *buf, uint64_t v) {
    for (size_t i = 0; i < PAYLOAD; i++) { v = v * 6364136223846793005ULL + 1442695040888963407ULL; buf[i] = v >> 56; }
}

static void write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) { ssize_t w = write(fd, c, n); if (w <= 0) { perror("write"); exit(3); } c += w; n -= (size_t)w; }
}

static void save(const char *path, struct state *st, unsigned char *buf) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror(path); exit(3); }
    fill(buf, st->value);
    write_all(fd, st, sizeof *st);
    write_all(fd, buf, PAYLOAD / 2);
    usleep(300000);
    write_all(fd, buf + PAYLOAD / 2, PAYLOAD / 2);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: appckpt OUT STATE STEPS [--restart]\n"); return 2; }
    const char *out = argv[1], *statef = argv[2];
    uint64_t steps = strtoull(argv[3], 0, 10);
    int churn = getenv("APPCKPT_CHURN") && atoi(getenv("APPCKPT_CHURN"));
    unsigned char *buf = malloc(PAYLOAD), *chk = malloc(PAYLOAD);
    struct state st = {0, 12345, 0};
    signal(SIGUSR1, on_usr1);
    if (argc > 4 && !strcmp(argv[4], "--restart")) {
        int fd = open(statef, O_RDONLY);
        if (fd < 0 || read(fd, &st, sizeof st) != sizeof st || read(fd, buf, PAYLOAD) != PAYLOAD) {
            fprintf(stderr, "appckpt: cannot read state %s\n", statef); return 4;
        }
        close(fd);
        fill(chk, st.value);
        if (memcmp(buf, chk, PAYLOAD)) { fprintf(stderr, "appckpt: torn state in %s\n", statef); return 5; }
        if (truncate(out, (off_t)st.out_len)) { perror(out); return 4; }
        fprintf(stderr, "appckpt: restarted at step %llu\n", (unsigned long long)st.step);
    }
    FILE *f = fopen(out, "a");
    if (!f || fseek(f, 0, SEEK_END)) { perror(out); return 3; }
    int churning = 0, requests = 0;
    for (; st.step < steps; st.step++) {
        if (asked || churning) {
            asked = 0;
            st.out_len = (uint64_t)ftell(f);
            save(statef, &st, buf);
            if (!churning) requests++;
            churning = churn && requests >= 2;
        }
        st.value = st.value * 2862933555777941757ULL + st.step;
        fprintf(f, "step %llu %016llx\n", (unsigned long long)st.step, (unsigned long long)st.value);
        fflush(f);
        usleep(40000);
    }
    fclose(f);
    return 0;
}
