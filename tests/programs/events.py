"""Event-driven program (like an asyncio loop): one epoll set over a timerfd, an eventfd, a UNIX seqpacket
socketpair to a child process and a connection accepted on a named UNIX stream socket; a datagram socketpair
holds messages that stay queued across checkpoints. Writes one line per round to argv[1]; argv[2] rounds.
Invariants a restart must keep: every request gets exactly one answer (got), the child streams exactly 10
bytes per answer (streamed == 10 * got), the queued datagrams come out in order, and the listening socket
still accepts a new connection at the end."""
import ctypes, os, select, socket, sys, time
out = open(sys.argv[1], "w", buffering=1)
n = int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
class ts(ctypes.Structure): _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
class its(ctypes.Structure): _fields_ = [("i", ts), ("v", ts)]
tfd = libc.timerfd_create(1, 0)
libc.timerfd_settime(tfd, 0, ctypes.byref(its(ts(0, 20000000), ts(0, 20000000))), None)
efd = os.eventfd(0)
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
dq, dr = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for k in range(5):
    dq.send(b"queued %d" % k)          # stays in dr's queue until the very end
path = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "srv.sock")
if os.path.exists(path): os.unlink(path)
lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); lst.bind(path); lst.listen(4)
pid = os.fork()
if pid == 0:
    a.close()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect(path)
    i = 0
    while True:
        msg = b.recv(100)
        if not msg: os._exit(0)
        i += 1
        try:
            b.send(msg.upper())
        except BrokenPipeError:
            os._exit(0)
        c.sendall(b"x" * 10)
        time.sleep(0.01)
b.close()
conn, _ = lst.accept()
ep = select.epoll()
ep.register(tfd, select.EPOLLIN); ep.register(efd, select.EPOLLIN); ep.register(a.fileno(), select.EPOLLIN)
ep.register(conn.fileno(), select.EPOLLIN)
ticks = got = streamed = 0
i = 0
a.send(b"msg0"); a.send(b"msg1")
while i < n:
    for fd, ev in ep.poll(1.0):
        if fd == tfd:
            ticks += int.from_bytes(os.read(tfd, 8), "little"); os.eventfd_write(efd, 1)
        elif fd == efd:
            os.eventfd_read(efd)
            i += 1
            out.write(f"round {i} got {got} streamed {streamed}\n")
        elif fd == a.fileno():
            m = a.recv(100); assert m.startswith(b"MSG"), m; got += 1
            a.send(b"msg%d" % (got + 1))
        elif fd == conn.fileno():
            streamed += len(conn.recv(4096))
a.close(); os.waitpid(pid, 0)
queued = [dr.recv(100).decode() for _ in range(5)]
late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); late.connect(path)
ok, _ = lst.accept()
out.write(f"queued {','.join(queued)}\n")
out.write(f"done got {got} streamed {streamed}\n")
