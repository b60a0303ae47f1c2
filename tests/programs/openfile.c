/* Keeps a data file open; once the file named by argv[2] appears, reads the data file back through its descriptor
   and exits 0 if it holds what was written before the checkpoint, 3 if not (tests of --checkpoint-open-files). */
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *text = "written before the checkpoint\n";
    char buf[256];
    if (argc < 3) return 2;
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0640);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text)) return 2;
    for (;;) {
        if (access(argv[2], F_OK) == 0) {
            ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
            buf[n > 0 ? n : 0] = 0;
            return strcmp(buf, text) == 0 ? 0 : 3;
        }
        usleep(20000);
    }
}
