"""Hold N authenticated, idle client connections to 127.0.0.1:PORT until
stdin closes (used by bench/cpu.sh). Prints "ready N" once all are open."""
import socket
import struct
import sys


def startup(port):
    s = socket.create_connection(("127.0.0.1", port))
    params = b"user\0postgres\0database\0postgres\0\0"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    buf = b""
    while True:  # until ReadyForQuery
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed during startup")
        buf += chunk
        while len(buf) >= 5:
            kind, length = buf[0:1], struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + length:
                break
            if kind == b"E":
                raise RuntimeError(buf[5 : 1 + length].decode(errors="replace"))
            if kind == b"Z":
                return s
            buf = buf[1 + length :]


port, n = int(sys.argv[1]), int(sys.argv[2])
conns = [startup(port) for _ in range(n)]
print(f"ready {len(conns)}", flush=True)
sys.stdin.read()
