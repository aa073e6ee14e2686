#!/usr/bin/env python3
"""Open N HTTP/1.1 keep-alive connections to URL, send one GET on each, then hold them open.

    python3 bench/hold_conns.py URL N READYFILE

When every connection has had its answer, READYFILE is created and a summary line is printed; the
connections stay open until the process is killed (SIGTERM/SIGINT). Used by bench/proxy.sh to read
a proxy's memory with N client connections open (each one also holds an upstream connection or
stream in the proxy). Exits 1 if fewer than N connections could be opened or answered.
"""
import selectors
import signal
import socket
import sys
import time
from urllib.parse import urlsplit


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    url, count, ready = sys.argv[1], sys.argv[2], sys.argv[3]
    if not count.isdigit() or int(count) < 1:
        print(f"hold_conns.py: N must be a positive number of connections, got '{count}'", file=sys.stderr)
        return 2
    n = int(count)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

    sel = selectors.DefaultSelector()
    socks, failed = [], 0
    # One connection at a time (connect, then its request), so the listen backlog never overflows.
    for i in range(n):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect((host, port))
            s.sendall(request)
        except OSError as e:
            failed += 1
            print(f"connection {i}: {e}", file=sys.stderr)
            s.close()
            continue
        s.setblocking(False)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, bytearray())

    answered, deadline = 0, time.monotonic() + 60
    pending = len(socks)
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            buf = key.data
            try:
                chunk = key.fileobj.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                failed += 1
                pending -= 1
                sel.unregister(key.fileobj)
                continue
            buf += chunk
            head, sep, body = bytes(buf).partition(b"\r\n\r\n")
            if sep and head.startswith(b"HTTP/1.1 200") and len(body) >= 6:
                answered += 1
                pending -= 1
                sel.unregister(key.fileobj)
    failed += pending

    open(ready, "w").close()
    print(f"{answered} connections open and answered, {failed} failed", flush=True)

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.2)
    for s in socks:
        s.close()
    return 0 if answered == n else 1


if __name__ == "__main__":
    sys.exit(main())
