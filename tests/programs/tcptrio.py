"""One of three processes, each started by its own dmtcp_launch, talking over TCP on loopback, each also
blocked reading its standard input in a thread (a pipe the harness keeps open and never writes to).

    tcptrio.py server OUT PORTFILE ROUNDS       listens; each round sends a number to both clients and
                                                 checks their answers (n+1, n+2)
    tcptrio.py client OUT PORTFILE K            connects; answers each number n with n+K

Each process writes one line per round to OUT; a line read on stdin is recorded as "stdin: ...", EOF on stdin
as "stdin EOF" (which must not happen while the harness holds the pipe open: not after a restart either)."""
import os, socket, sys, threading, time

role, out_path, port_file, arg = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = open(out_path, "a", buffering=1)


def stdin_reader():
    while True:
        line = sys.stdin.readline()
        if not line:
            out.write("stdin EOF\n")
            return
        out.write(f"stdin: {line}")


threading.Thread(target=stdin_reader, daemon=True).start()


def recv_line(s: socket.socket, buf: bytearray) -> str:
    while b"\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit(f"{role}: peer closed")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


if role == "server":
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(lst.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    conns = [lst.accept()[0] for _ in range(2)]
    bufs = [bytearray(), bytearray()]
    ks = [int(recv_line(c, b)) for c, b in zip(conns, bufs)]
    order = sorted(range(2), key=lambda i: ks[i])         # the clients connect in any order
    conns, bufs, ks = [conns[i] for i in order], [bufs[i] for i in order], [ks[i] for i in order]
    for r in range(arg):
        time.sleep(0.02)
        for c in conns:
            c.sendall(f"{r * 10}\n".encode())
        answers = [int(recv_line(c, b)) for c, b in zip(conns, bufs)]
        ok = all(a == r * 10 + k for a, k in zip(answers, ks))
        out.write(f"round {r} {'ok' if ok else 'BAD'} {answers}\n")
    for c in conns:
        c.sendall(b"end\n")
    out.write("done\n")
else:
    while not os.path.exists(port_file):
        time.sleep(0.01)
    s = socket.create_connection(("127.0.0.1", int(open(port_file).read())))
    s.sendall(f"{arg}\n".encode())
    buf = bytearray()
    n = 0
    while True:
        line = recv_line(s, buf)
        if line == "end":
            break
        s.sendall(f"{int(line) + arg}\n".encode())
        n += 1
        out.write(f"answered {n}\n")
    out.write("done\n")
