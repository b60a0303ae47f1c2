/* Signal dispositions across a checkpoint: SIGUSR1 caught (SA_RESTART, SIGUSR2 blocked in the handler),
 * SIGTERM and SIGHUP ignored, SIGCHLD left SIG_DFL but with SA_NOCLDWAIT (children reap themselves),
 * every other signal SIG_DFL. Every 50 ms the process compares all of them with what it set and appends
 * "ok k" or "BAD sig what" to OUT; on SIGUSR1 it appends "usr1"; a child forked each round must not stay a
 * zombie (SA_NOCLDWAIT). Usage: sigdisp OUT */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int out;
static volatile sig_atomic_t got;
static void on_usr1(int s) { (void)s; got = 1; }

static void say(const char *s) { if (write(out, s, strlen(s)) < 0) _exit(9); }

int main(int argc, char **argv) {
    (void)argc;
    out = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (int s = 1; s < 65; s++) if (s != SIGKILL && s != SIGSTOP) signal(s, SIG_DFL);   /* whatever we inherited */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR2);
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGTERM, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sa.sa_flags = SA_NOCLDWAIT;
    sigaction(SIGCHLD, &sa, NULL);
    for (long k = 1;; k++) {
        char line[96];
        int bad = 0;
        for (int s = 1; s < 65; s++) {
            struct sigaction cur;
            if (s == SIGKILL || s == SIGSTOP || sigaction(s, NULL, &cur)) continue;
            void (*want)(int) = s == SIGUSR1 ? on_usr1 : (s == SIGTERM || s == SIGHUP) ? SIG_IGN : SIG_DFL;
            const char *what = NULL;
            if (cur.sa_handler != want) what = "handler";
            else if (s == SIGUSR1 && (!(cur.sa_flags & SA_RESTART) || !sigismember(&cur.sa_mask, SIGUSR2)))
                what = "flags-or-mask";
            else if (s == SIGCHLD && !(cur.sa_flags & SA_NOCLDWAIT)) what = "nocldwait";
            if (what) { snprintf(line, sizeof line, "BAD %d %s\n", s, what); say(line); bad = 1; }
        }
        pid_t c = fork();
        if (c == 0) _exit(0);
        usleep(50000);
        pid_t w = 0;
        for (int i = 0; c > 0 && i < 200 && (w = waitpid(c, NULL, WNOHANG)) == 0; i++) usleep(10000);
        if (w == c) say("BAD 17 zombie\n");   /* with SA_NOCLDWAIT the child reaps itself: ECHILD */
        if (got) { got = 0; say("usr1\n"); }
        if (!bad) { snprintf(line, sizeof line, "ok %ld\n", k); say(line); }
    }
}
