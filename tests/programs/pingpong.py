"""Two halves of a job talking TCP across hosts. Usage:
  pingpong.py server PORTFILE           listen on every address, write the port to PORTFILE, answer each
                                        line "I" with "I*2" until the client closes
  pingpong.py client HOST PORTFILE N    send 1..N, one line every 50 ms, check each answer, print
                                        "ok I HOSTNAME"; then "done"; exit 3 on a wrong answer
"""
import os, socket, sys, time

if sys.argv[1] == "server":
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", 0))
    lst.listen(1)
    tmp = sys.argv[2] + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(lst.getsockname()[1]))
    os.rename(tmp, sys.argv[2])
    c, _ = lst.accept()
    f = c.makefile("rwb", buffering=0)
    for line in f:
        f.write(b"%d\n" % (int(line) * 2))
    sys.exit(0)

host, portfile, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
while not os.path.exists(portfile):
    time.sleep(0.05)
c = socket.create_connection((host, int(open(portfile).read())))
f = c.makefile("rwb", buffering=0)

for i in range(1, n + 1):
    f.write(b"%d\n" % i)
    answer = int(f.readline())
    if answer != 2 * i:
        print(f"bad answer {answer} to {i}", flush=True)
        sys.exit(3)
    print(f"ok {i} {socket.gethostname()}", flush=True)   # asked each time: where it runs now
    time.sleep(0.05)
print("done", flush=True)
