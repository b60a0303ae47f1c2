"""A TCP server and its clients in one job, on loopback, with data in flight in both directions.

The parent listens on 127.0.0.1 (random port, written to argv[1] + ".port"); client 1 streams argv[2] bytes of a
known pattern as fast as it can while the server reads slowly (so the client's send queue and the server's
receive queue stay full), and the server answers one line per MiB read, which client 1 checks. Client 2 sends
100000 bytes, shuts down writing and waits for the server's answer; the server leaves that connection
half-closed until the main stream is done. At the end a third client connects to the same listener.
The server writes one progress line per round to argv[1]; any byte lost, duplicated or reordered shows as
bad > 0 or a wrong total.
"""
import os, socket, sys, time

out = open(sys.argv[1], "w", buffering=1)
target = int(sys.argv[2])
PERIOD = 251
BLOCK = bytes(i * 7 % PERIOD for i in range(PERIOD)) * (70000 // PERIOD + 2)


def pattern(off: int, n: int) -> bytes:
    start = off % PERIOD
    return BLOCK[start:start + n]


lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("127.0.0.1", 0))
lst.listen(8)
port = lst.getsockname()[1]
with open(sys.argv[1] + ".port", "w") as f:
    f.write(str(port))


def client1():
    c = socket.create_connection(("127.0.0.1", port))
    sent = 0
    while sent < target:
        n = min(65536, target - sent)
        c.sendall(pattern(sent, n))
        sent += n
    c.shutdown(socket.SHUT_WR)
    answers = c.makefile("rb").read().decode().splitlines()
    want = [f"ok {k}" for k in range(1, target // (1 << 20) + 1)] + [f"total {target}"]
    os._exit(0 if answers == want else 3)


def client2():
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"h" * 100000)
    c.shutdown(socket.SHUT_WR)
    answer = c.recv(100)
    os._exit(0 if answer == b"got 100000" else 4)


kids = []
for fn in (client1,):
    pid = os.fork()
    if pid == 0:
        lst.close()
        fn()
    kids.append(pid)
conn, _ = lst.accept()
pid = os.fork()
if pid == 0:
    lst.close(); conn.close()
    client2()
kids.append(pid)
conn2, _ = lst.accept()

got = bad = 0
mib = 0
rounds = 0
while True:
    data = conn.recv(16384)
    if not data:
        break
    if data != pattern(got, len(data)):
        bad += 1
    got += len(data)
    while got >= (mib + 1) << 20:
        mib += 1
        conn.sendall(b"ok %d\n" % mib)
    rounds += 1
    if rounds % 16 == 0:
        out.write(f"round {rounds} got {got} bad {bad}\n")
    time.sleep(0.002)
conn.sendall(b"total %d\n" % got)
conn.close()

half = b""
while True:
    d = conn2.recv(65536)
    if not d:
        break
    half += d
conn2.sendall(b"got %d" % len(half))
conn2.close()

status = []
for k in kids:
    _, st = os.waitpid(k, 0)
    status.append(os.waitstatus_to_exitcode(st))

pid = os.fork()
if pid == 0:
    lst.close()
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"late")
    os._exit(0)
late, _ = lst.accept()
hello = late.recv(10)
os.waitpid(pid, 0)
out.write(f"done got {got} bad {bad} half {len(half)} clients {status} late {hello.decode()}\n")
