/* SysV shared memory between a parent and its child, checked every round.
 *   A: key argv[2], 0640, ~4 MiB and sparse (every 5th page written, the rest never touched); the parent also
 *      has it attached a second time read-only. Parent and child ping-pong through a control page of A.
 *   B: IPC_PRIVATE, attached by both, marked IPC_RMID after the fork; the child answers through it as well.
 *   C: key argv[2]+1, created and filled, then detached: nobody has it attached (found again by its shmid).
 * Checked: answers seen through both processes' attachments and the read-only one, shmctl(IPC_STAT) (key,
 * size, mode, nattch, SHM_DEST), shmget by key finding the same shmids, /proc/self/maps naming real SysV
 * attachments (inode = shmid), A's contents page by page, C's contents through a fresh shmat by id.
 * One line per round to argv[1]: "round r ok" or "round r BAD <what>"; argv[3] rounds. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>

#define SZ_A (4 * 1024 * 1024 + 1000)
#define SZ_B 20000
#define SZ_C 8192
#define PAGE_WORDS 512

static uint64_t pat(uint64_t i) { return i * 0x9E3779B97F4A7C15ull ^ (i >> 3); }

static char bad[256];

static void fail(const char *what, long a, long b) {
    if (!bad[0]) snprintf(bad, sizeof bad, "%s (%ld vs %ld)", what, a, b);
}

static void check_stat(const char *name, int id, key_t key, size_t size, int mode, long nattch, int dest) {
    struct shmid_ds ds;
    char what[96];
    if (shmctl(id, IPC_STAT, &ds) != 0) { snprintf(what, sizeof what, "%s IPC_STAT", name); fail(what, errno, 0); return; }
    snprintf(what, sizeof what, "%s key", name);
    if (ds.shm_perm.__key != key) fail(what, ds.shm_perm.__key, key);
    snprintf(what, sizeof what, "%s size", name);
    if (ds.shm_segsz != size) fail(what, ds.shm_segsz, size);
    snprintf(what, sizeof what, "%s mode", name);
    if ((ds.shm_perm.mode & 0777) != mode) fail(what, ds.shm_perm.mode, mode);
    snprintf(what, sizeof what, "%s nattch", name);
    if ((long)ds.shm_nattch != nattch) fail(what, ds.shm_nattch, nattch);
    snprintf(what, sizeof what, "%s SHM_DEST", name);
    if (!!(ds.shm_perm.mode & SHM_DEST) != dest) fail(what, ds.shm_perm.mode, dest);
}

/* the line of /proc/self/maps starting at addr must be a SysV attachment of shmid `id` named after `key` */
static void check_maps(const char *name, const volatile void *addr, int id, key_t key, const char *perms) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512], want[24], path[256] = "", pr[8] = "";
    unsigned long start, end, off, ino = 0;
    int found = 0;
    snprintf(want, sizeof want, "/SYSV%08x", (unsigned)key);
    while (f && fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx %7s %lx %*s %lu %255s", &start, &end, pr, &off, &ino, path) == 6 &&
            start == (unsigned long)addr) { found = 1; break; }
    }
    if (f) fclose(f);
    char what[96];
    snprintf(what, sizeof what, "%s not in maps as %s", name, want);
    if (!found || strcmp(path, want) != 0) { fail(what, found, 0); return; }
    snprintf(what, sizeof what, "%s maps inode", name);
    if ((long)ino != id) fail(what, ino, id);
    snprintf(what, sizeof what, "%s maps perms", name);
    if (strcmp(pr, perms) != 0) fail(what, pr[1], perms[1]);
}

int main(int argc, char **argv) {
    FILE *out = fopen(argv[1], "a");
    key_t key = (key_t)strtoul(argv[2], NULL, 0);
    long rounds = atol(argv[3]);
    setvbuf(out, NULL, _IOLBF, 0);
    int idA = shmget(key, SZ_A, IPC_CREAT | IPC_EXCL | 0640);
    int idB = shmget(IPC_PRIVATE, SZ_B, IPC_CREAT | 0600);
    int idC = shmget(key + 1, SZ_C, IPC_CREAT | IPC_EXCL | 0600);
    if (idA < 0 || idB < 0 || idC < 0) { perror("shmget"); return 1; }
    volatile uint64_t *A = shmat(idA, NULL, 0);
    volatile const uint64_t *A2 = shmat(idA, NULL, SHM_RDONLY);
    volatile uint64_t *B = shmat(idB, NULL, 0);
    volatile uint64_t *C = shmat(idC, NULL, 0);
    long npages = SZ_A / 4096;
    for (long k = 0; k < npages; k += 5)
        for (int j = 0; j < 8; j++) A[k * PAGE_WORDS + j] = pat(k * 8 + j);
    for (int i = 0; i < SZ_C / 8; i++) C[i] = pat(1000 + i);
    shmdt((const void *)C);
    volatile uint64_t *ctl = A + PAGE_WORDS;          /* page 1: never part of the pattern */
    pid_t c = fork();
    if (c == 0) {
        shmdt((const void *)A2);
        for (uint64_t r = 1;; r++) {
            while (ctl[0] < r) usleep(300);
            if (ctl[0] == UINT64_MAX) _exit(0);
            ctl[8 + r % 256] = r * r;
            B[r % 100] = r + 7;
            ctl[1] = r;
        }
    }
    shmctl(idB, IPC_RMID, NULL);
    for (uint64_t r = 1; r <= (uint64_t)rounds; r++) {
        bad[0] = 0;
        ctl[0] = r;
        while (ctl[1] < r) usleep(300);
        if (ctl[8 + r % 256] != r * r) fail("answer in A", ctl[8 + r % 256], r * r);
        if (A2[PAGE_WORDS + 8 + r % 256] != r * r) fail("answer in read-only A", 0, 0);
        if (B[r % 100] != r + 7) fail("answer in B", B[r % 100], r + 7);
        if (r % 10 == 1) {
            check_stat("A", idA, key, SZ_A, 0640, 3, 0);
            check_stat("B", idB, IPC_PRIVATE, SZ_B, 0600, 2, 1);
            check_stat("C", idC, key + 1, SZ_C, 0600, 0, 0);
            if (shmget(key, 0, 0) != idA) fail("shmget(key A)", shmget(key, 0, 0), idA);
            if (shmget(key + 1, 0, 0) != idC) fail("shmget(key C)", shmget(key + 1, 0, 0), idC);
        }
        if (r % 50 == 1) {
            check_maps("A", A, idA, key, "rw-s");
            check_maps("A2", A2, idA, key, "r--s");
            check_maps("B", B, idB, IPC_PRIVATE, "rw-s");
            volatile const uint64_t *c2 = shmat(idC, NULL, SHM_RDONLY);
            if (c2 == (void *)-1) fail("shmat(C by id)", errno, 0);
            else {
                for (int i = 0; i < SZ_C / 8; i++)
                    if (c2[i] != pat(1000 + i)) { fail("C contents", i, 0); break; }
                check_stat("C attached", idC, key + 1, SZ_C, 0600, 1, 0);
                shmdt((const void *)c2);
            }
            for (long k = 0; k < npages; k++) {
                if (k == 1) continue;
                for (int j = 0; j < PAGE_WORDS; j++) {
                    uint64_t want = (k % 5 == 0 && j < 8) ? pat(k * 8 + j) : 0;
                    if (A[k * PAGE_WORDS + j] != want) { fail("A contents at page", k, j); k = npages; break; }
                }
            }
        }
        if (bad[0]) fprintf(out, "round %llu BAD %s\n", (unsigned long long)r, bad);
        else fprintf(out, "round %llu ok\n", (unsigned long long)r);
        usleep(5000);
    }
    ctl[0] = UINT64_MAX;
    waitpid(c, NULL, 0);
    shmctl(idA, IPC_RMID, NULL);
    shmctl(idC, IPC_RMID, NULL);
    fprintf(out, "done\n");
    return 0;
}
