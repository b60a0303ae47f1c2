/* SysV semaphores and message queues, checked every round across checkpoints and restarts.
 *   S: key argv[2], 3 semaphores, 0640. Thread "waiter" blocks in semop(S[0] -= 1) until the main thread posts
 *      it, then posts S[2]; S[1] counts rounds (+1 each, SEM_UNDO-free).
 *   Q: key argv[2]+1, 0600. Always holds a backlog of 4 messages of type 1 ("m<r>".. "m<r+3>"): each round the
 *      main thread sends "m<r+4>" and receives the oldest, which must be "m<r>". Thread "echo" blocks in
 *      msgrcv(type 2) and answers each "ping <r>" with "pong <r>" (type 3).
 *   P: IPC_PRIVATE semaphore set of 1, found only by the id the program keeps; its value is the round number.
 * Checked each round: semget/msgget by key find the same ids, IPC_STAT (key, mode, nsems, qnum), the values,
 * the message contents. One line per round to argv[1]: "round r ok" or "round r BAD <what>" (then exit 3);
 * argv[3] rounds, argv[4] milliseconds of sleep per round (the checkpoints land while both threads block). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <time.h>
#include <unistd.h>

union semun { int val; struct semid_ds *buf; unsigned short *array; };

struct msg { long type; char text[64]; };

static int S, Q, P;
static long rounds;
static FILE *out;

static void bad(long r, const char *what, long a, long b) {
    fprintf(out, "round %ld BAD %s (%ld vs %ld)\n", r, what, a, b);
    exit(3);
}

/* a checkpoint may interrupt these (signal(7): semop fails with EINTR after a stop); the transparency of that
 * is tested elsewhere, here we only care about the IPC objects' state */
static void sem_add(int id, int num, int delta) {
    struct sembuf op = {(unsigned short)num, (short)delta, 0};
    while (semop(id, &op, 1) != 0) {
        if (errno != EINTR) { perror("semop"); exit(4); }
    }
}

static void msg_send(long type, const char *text) {
    struct msg m = {type, ""};
    snprintf(m.text, sizeof m.text, "%s", text);
    while (msgsnd(Q, &m, strlen(m.text) + 1, 0) != 0) {
        if (errno != EINTR) { perror("msgsnd"); exit(4); }
    }
}

static void msg_recv(long type, char *text) {
    struct msg m;
    while (msgrcv(Q, &m, sizeof m.text, type, 0) < 0) {
        if (errno != EINTR) { perror("msgrcv"); exit(4); }
    }
    strcpy(text, m.text);
}

static void *waiter(void *arg) {
    (void)arg;
    for (long r = 0; r < rounds; r++) {
        sem_add(S, 0, -1);
        sem_add(S, 2, 1);
    }
    return NULL;
}

static void *echo(void *arg) {
    (void)arg;
    char text[64], want[64], reply[64];
    for (long r = 0; r < rounds; r++) {
        msg_recv(2, text);
        snprintf(want, sizeof want, "ping %ld", r);
        if (strcmp(text, want) != 0) bad(r, "echo got the wrong ping", (long)text[5], r);
        snprintf(reply, sizeof reply, "pong %ld", r);
        msg_send(3, reply);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s out key rounds ms\n", argv[0]); return 2; }
    out = fopen(argv[1], "a");
    key_t key = (key_t)strtoul(argv[2], NULL, 0);
    rounds = atol(argv[3]);
    long ms = atol(argv[4]);
    setvbuf(out, NULL, _IOLBF, 0);
    S = semget(key, 3, IPC_CREAT | IPC_EXCL | 0640);
    Q = msgget(key + 1, IPC_CREAT | IPC_EXCL | 0600);
    P = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
    if (S < 0 || Q < 0 || P < 0) { perror("semget/msgget"); return 1; }
    unsigned short init[3] = {0, 100, 0};
    union semun arg = {.array = init};
    if (semctl(S, 0, SETALL, arg) != 0) { perror("SETALL"); return 1; }
    for (int i = 0; i < 4; i++) {
        char t[16];
        snprintf(t, sizeof t, "m%d", i);
        msg_send(1, t);
    }
    pthread_t t1, t2;
    pthread_create(&t1, NULL, waiter, NULL);
    pthread_create(&t2, NULL, echo, NULL);
    struct timespec nap = {ms / 1000, (ms % 1000) * 1000000L};
    for (long r = 0; r < rounds; r++) {
        while (nanosleep(&nap, &nap) != 0 && errno == EINTR) {}
        nap.tv_sec = ms / 1000; nap.tv_nsec = (ms % 1000) * 1000000L;
        if (semget(key, 0, 0) != S) bad(r, "semget by key", semget(key, 0, 0), S);
        if (msgget(key + 1, 0) != Q) bad(r, "msgget by key", msgget(key + 1, 0), Q);
        struct semid_ds sds;
        union semun sa = {.buf = &sds};
        if (semctl(S, 0, IPC_STAT, sa) != 0) bad(r, "sem IPC_STAT", errno, 0);
        if (sds.sem_nsems != 3) bad(r, "nsems", sds.sem_nsems, 3);
        if ((sds.sem_perm.mode & 0777) != 0640) bad(r, "sem mode", sds.sem_perm.mode, 0640);
        if (sds.sem_perm.__key != key) bad(r, "sem key", sds.sem_perm.__key, key);
        struct msqid_ds mds;
        if (msgctl(Q, IPC_STAT, &mds) != 0) bad(r, "msg IPC_STAT", errno, 0);
        if (mds.msg_qnum != 4) bad(r, "qnum", mds.msg_qnum, 4);
        if ((mds.msg_perm.mode & 0777) != 0600) bad(r, "msg mode", mds.msg_perm.mode, 0600);
        if (semctl(S, 1, GETVAL) != 100 + r) bad(r, "S[1]", semctl(S, 1, GETVAL), 100 + r);
        if (semctl(P, 0, GETVAL) != r) bad(r, "P[0]", semctl(P, 0, GETVAL), r);
        /* the backlog: send one, the oldest comes out */
        char t[64], want[64];
        snprintf(t, sizeof t, "m%ld", r + 4);
        msg_send(1, t);
        msg_recv(1, t);
        snprintf(want, sizeof want, "m%ld", r);
        if (strcmp(t, want) != 0) bad(r, "backlog order", atol(t + 1), r);
        /* wake the waiter and wait for its answer */
        sem_add(S, 0, 1);
        sem_add(S, 2, -1);
        /* ping the echo thread */
        snprintf(t, sizeof t, "ping %ld", r);
        msg_send(2, t);
        msg_recv(3, t);
        snprintf(want, sizeof want, "pong %ld", r);
        if (strcmp(t, want) != 0) bad(r, "pong", atol(t + 5), r);
        sem_add(S, 1, 1);
        sem_add(P, 0, 1);
        fprintf(out, "round %ld ok\n", r);
    }
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    semctl(S, 0, IPC_RMID);
    semctl(P, 0, IPC_RMID);
    msgctl(Q, IPC_RMID, NULL);
    fprintf(out, "done\n");
    return 0;
}
