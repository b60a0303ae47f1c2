"""A pseudo-terminal whose master was closed: its slave is hung up. Usage: hungpty.py OUT N
A child (ignoring SIGHUP) leads a session with the slave as controlling terminal and opens /dev/tty; the parent closes the
master, which hangs both up. Then the child checks, N times every 20 ms, that the slave and its /dev/tty
descriptor still behave hung up (reads see end of file, writes fail with EIO) and writes "tick I" (or "BAD ...")
to OUT; at the end "done". The parent waits for it."""
import errno
import fcntl
import os
import signal
import sys
import termios
import time

out_path, n = sys.argv[1], int(sys.argv[2])
master, slave = os.openpty()
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(master)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)          # the hangup sends it to the session leader
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    tty = os.open("/dev/tty", os.O_RDWR)
    os.write(ready_w, b"x")
    os.read(go_r, 1)                      # the parent has closed the master
    out = open(out_path, "a", buffering=1)

    def hung(fd):
        if os.read(fd, 10) != b"":
            return "read"
        try:
            os.write(fd, b"x")
            return "write"
        except OSError as e:
            return "" if e.errno == errno.EIO else f"write {e.strerror}"

    for i in range(1, n + 1):
        bad = [f"{name}: {w}" for name, fd in (("slave", slave), ("tty", tty)) if (w := hung(fd))]
        out.write(f"BAD tick {i} {bad}\n" if bad else f"tick {i}\n")
        time.sleep(0.02)
    out.write("done\n")
    os._exit(0)
os.close(slave)
os.read(ready_r, 1)
os.close(master)
time.sleep(0.05)
os.write(go_w, b"x")
os.waitpid(pid, 0)
