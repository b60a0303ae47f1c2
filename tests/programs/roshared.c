/* A read-only MAP_SHARED mapping of a file opened O_RDONLY (as glibc maps gconv-modules.cache, and Python
   with a UTF-8 locale): each step prints its number and a checksum of the mapping. args: out steps file */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int steps = atoi(argv[2]);
    int fd = open(argv[3], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) return 3;
    const unsigned char *m = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) return 4;
    close(fd);
    char *heap = malloc(1 << 20);              /* private memory that changes: the incremental image has work */
    for (int i = 0; i < steps; i++) {
        unsigned long sum = 0;
        for (off_t k = 0; k < st.st_size; k += 512) sum += m[k];
        heap[(i * 4096) % (1 << 20)] = (char)i;
        FILE *f = fopen(argv[1], "a");
        if (!f) return 5;
        fprintf(f, "%d %lu\n", i, sum);
        fclose(f);
        usleep(20000);
    }
    return 0;
}
