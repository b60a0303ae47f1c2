/* Exact write tracking without soft-dirty: userfaultfd async write-protect + the PAGEMAP_SCAN ioctl (Linux 6.7+),
 * checked from another process, as the agent would use it. Not part of hpcckpt yet (docs/design.md, "Next:
 * exact write tracking"); this program shows the kernel facts the design rests on and times them:
 *
 *     gcc -O2 -o /tmp/wptrack bench/wptrack.c && /tmp/wptrack [MiB]
 *
 * The child registers MiB of anonymous memory with its own userfaultfd (UFFD_FEATURE_WP_ASYNC: write faults are
 * resolved by the kernel itself, no handler thread); the parent arms tracking through /proc/CHILD/pagemap
 * (PAGEMAP_SCAN with PM_SCAN_WP_MATCHING), the child writes 5 % of the pages, touches a never-touched page,
 * reads another and MADV_DONTNEEDs two, and the parent asks which pages were written (and re-arms atomically).
 * Debian 12's kernel headers predate these interfaces: the constants are spelled out below (linux/fs.h,
 * linux/userfaultfd.h of 6.7). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FEATURE_WP_UNPOPULATED (1 << 13)
#define FEATURE_WP_ASYNC (1 << 15)
struct page_region { uint64_t start, end, categories; };
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask,
        category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN_IOCTL _IOWR('f', 16, struct pm_scan_arg)
#define SCAN_WP_MATCHING (1 << 0)
#define SCAN_CHECK_WPASYNC (1 << 1)
#define IS_WRITTEN (1 << 1)
#define PG 4096

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Written pages of [m, m+len) of the process behind pagemap fd pm; with wp, write-protects them again. */
static long scan(int pm, char *m, size_t len, struct page_region *vec, size_t n, int wp, size_t *pages) {
    struct pm_scan_arg a = {.size = sizeof a, .flags = (wp ? SCAN_WP_MATCHING : 0) | SCAN_CHECK_WPASYNC,
                            .start = (uintptr_t)m, .end = (uintptr_t)m + len, .vec = (uintptr_t)vec,
                            .vec_len = n, .category_mask = IS_WRITTEN, .return_mask = IS_WRITTEN};
    long r = ioctl(pm, PAGEMAP_SCAN_IOCTL, &a);
    *pages = 0;
    for (long i = 0; i < r; i++) *pages += (vec[i].end - vec[i].start) / PG;
    return r;
}

int main(int argc, char **argv) {
    size_t mb = argc > 1 ? atol(argv[1]) : 1024, len = mb << 20, n = len / PG;
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(m, 1, len - 2 * PG);                       /* the last two pages: never touched */
    int go[2], done[2];
    if (pipe(go) || pipe(done)) return 1;
    pid_t c = fork();
    if (c == 0) {
        char x;
        int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
        struct uffdio_api api = {.api = UFFD_API, .features = FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED};
        struct uffdio_register reg = {.range = {(uintptr_t)m, len}, .mode = UFFDIO_REGISTER_MODE_WP};
        if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) || ioctl(uffd, UFFDIO_REGISTER, &reg)) {
            perror("userfaultfd");
            _exit(1);
        }
        if (write(done[1], "r", 1) != 1 || read(go[0], &x, 1) != 1) _exit(1);
        for (size_t i = 0; i < n - 2; i += 20) m[i * PG + 5] = 2;   /* 5 % of the pages */
        m[(n - 2) * PG] = 3;                                         /* first touch */
        volatile char y = m[(n - 1) * PG];                           /* a read maps the zero page */
        (void)y;
        madvise(m + PG, 2 * PG, MADV_DONTNEED);                      /* pages 1 and 2 now read as zero */
        if (write(done[1], "w", 1) != 1 || read(go[0], &x, 1) != 1) _exit(1);
        _exit(0);
    }
    char x, path[64];
    if (read(done[0], &x, 1) != 1) return 1;
    snprintf(path, sizeof path, "/proc/%d/pagemap", c);
    int pm = open(path, O_RDONLY);
    struct page_region *vec = calloc(n, sizeof *vec);
    size_t pages;
    double t = now();
    long r = scan(pm, m, len, vec, n, 1, &pages);
    printf("arm %zu MiB of another process: %.1f ms (%ld: %s)\n", mb, (now() - t) * 1e3, r, r < 0 ? "failed" : "ok");
    if (r < 0) return 1;
    if (write(go[1], "g", 1) != 1 || read(done[0], &x, 1) != 1) return 1;
    t = now();
    r = scan(pm, m, len, vec, n, 1, &pages);
    printf("written pages: %zu in %ld runs, found and re-armed in %.1f ms (expected %zu: 5 %% + first touch + "
           "2 dropped)\n", pages, r, (now() - t) * 1e3, (n - 2 + 19) / 20 + 1 + 2);
    printf("page 1 (dropped) reported: %s; last page (read only) reported: %s\n",
           r > 0 && vec[0].start <= (uintptr_t)m + PG && (uintptr_t)m + PG < vec[0].end ? "yes" : "check",
           vec[r - 1].end > (uintptr_t)m + (n - 1) * PG ? "yes (wrong)" : "no");
    r = scan(pm, m, len, vec, n, 1, &pages);
    printf("scan again without writes: %zu pages\n", pages);
    if (write(go[1], "g", 1) != 1) return 1;
    wait(NULL);
    return 0;
}
