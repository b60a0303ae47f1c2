/* An interactive terminal program. Usage: ttyprog MODE [notty], MODE one of
 *   noecho  canonical input, echo off (like a password prompt)
 *   raw     cfmakeraw: no echo, no line editing, no signals, no output processing (like an editor)
 * It sets that mode on its standard input, opens /dev/tty (unless "notty" is given) and then answers every line read from stdin with
 * "got <LINE IN UPPER CASE>" on stdout. The line "state" makes it report what it sees of its terminal:
 *   state echo=E icanon=I opost=O fg=F tty=T size=ROWSxCOLS winch=W
 * (E/I/O: the flags of stdin's termios, F: 1 if its process group is the terminal's foreground group,
 * T: 1 if writing to its /dev/tty descriptor works, W: SIGWINCHs received); "tty" writes "via-tty" through
 * /dev/tty; "quit" exits.
 * Output lines end in "\r\n" in raw mode (no output processing) and "\n" otherwise. */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

static int raw;
static volatile sig_atomic_t winches;

static void on_winch(int sig) { (void)sig; winches++; }

static void say(int fd, const char *text) {
    char buf[600];
    int n = snprintf(buf, sizeof buf, "%s%s", text, raw ? "\r\n" : "\n");
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return;
        }
        p += w;
        n -= w;
    }
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    raw = !strcmp(argv[1], "raw");
    struct sigaction sa = {.sa_handler = on_winch, .sa_flags = SA_RESTART};
    sigaction(SIGWINCH, &sa, NULL);
    struct termios t;
    if (tcgetattr(0, &t) != 0) {
        perror("tcgetattr");
        return 3;
    }
    if (raw)
        cfmakeraw(&t);
    else
        t.c_lflag &= ~(ECHO | ECHOE | ECHOK | ECHONL);
    tcsetattr(0, TCSANOW, &t);
    int tty = argc > 2 && !strcmp(argv[2], "notty") ? -1 : open("/dev/tty", O_RDWR | O_CLOEXEC);
    say(1, "ready");
    char line[512];
    size_t len = 0;
    for (;;) {
        char c;
        ssize_t n = read(0, &c, 1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;
        if (c != '\r' && c != '\n') {
            if (len < sizeof line - 1) line[len++] = c;
            continue;
        }
        line[len] = 0;
        len = 0;
        if (!line[0]) continue;
        char out[600];
        if (!strcmp(line, "quit")) {
            say(1, "bye");
            return 0;
        } else if (!strcmp(line, "state")) {
            struct termios now;
            tcgetattr(0, &now);
            struct winsize ws = {0};
            ioctl(0, TIOCGWINSZ, &ws);
            int tty_ok = tty >= 0 && write(tty, "", 0) == 0;
            snprintf(out, sizeof out, "state echo=%d icanon=%d opost=%d fg=%d tty=%d size=%dx%d winch=%d",
                     !!(now.c_lflag & ECHO), !!(now.c_lflag & ICANON), !!(now.c_oflag & OPOST),
                     tcgetpgrp(0) == getpgrp(), tty_ok, ws.ws_row, ws.ws_col, (int)winches);
            say(1, out);
        } else if (!strcmp(line, "tty")) {
            say(tty, "via-tty");
        } else {
            for (char *p = line; *p; p++) *p = toupper((unsigned char)*p);
            snprintf(out, sizeof out, "got %s", line);
            say(1, out);
        }
    }
}
