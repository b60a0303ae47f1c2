/* Latency workload (bench/latency.py): touches MB megabytes (argv[1]) of memory, prints "ready", then writes
 * one byte to stdout every millisecond for ever. After a restart the first byte the restart's stdout carries
 * is the first thing the restored program did: the end of restart-to-running. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    size_t mb = argc > 1 ? (size_t)atol(argv[1]) : 1;
    char *buf = malloc(mb << 20);
    for (size_t i = 0; i < (mb << 20); i += 4096) buf[i] = (char)(i >> 12) | 1;   /* every page touched */
    printf("ready\n");
    fflush(stdout);
    struct timespec ms = {0, 1000000};
    for (;;) {
        nanosleep(&ms, NULL);
        if (write(1, ".", 1) < 0) return 1;
    }
}
