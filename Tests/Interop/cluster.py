"""A real Sigil cluster on loopback for interop tests: `sigil server run` and `sigil agent run`
as child processes, bounded in time, always stopped by the test that started them."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from interop_util import free_port, run

TRUST_DOMAIN = "example.org"
WEB = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web"
API = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/api"
# api accepts calls from web (an ALLOW policy by principal); tests add `to:` rules below it.
API_FROM_WEB = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-from-web, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["{TRUST_DOMAIN}/ns/shop/sa/web"]}}}}]
"""


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - report the last failure
            last = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last})" if last else ""))


class Proc:
    def __init__(self, args, log: Path, env=None):
        self.args = [str(a) for a in args]
        self.log_path = log
        self.log = open(log, "ab")  # a restarted process keeps the earlier run's log above its own
        self.log_start = self.log.tell()  # output() is this process's part only
        self.p = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 15) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()
        return self.p.returncode

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")


@contextlib.contextmanager
def served_cluster(sigil_bin):
    """A Cluster with its server running, closed (server, agents, proxies, files) on exit."""
    c = Cluster(sigil_bin)
    try:
        c.start_server()
        yield c
    finally:
        c.close()


def read_request_head(conn: socket.socket, data: bytes) -> tuple[bytes, bytes] | None:
    """Reads until `data` holds a whole request head: (head, the bytes after it), or None at EOF."""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


class Cluster:
    """One CA server and any number of agents, under a world-traversable temp dir (so that a
    workload running as another uid can reach the agent's socket, as on a real node)."""

    def __init__(self, sigil_bin: Path, ca_args=()):
        self.bin = Path(sigil_bin)
        self.root = Path(tempfile.mkdtemp(prefix="sigil-it-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.ca_dir = self.root / "ca"
        self.admin_socket = self.root / "admin" / "admin.sock"
        self.port = free_port()
        self.server: Proc | None = None
        self.agents: dict[str, Proc] = {}
        self.proxies: dict[str, Proc] = {}
        res = run([self.bin, "ca", "init", "--trust-domain", TRUST_DOMAIN, "--data-dir", self.ca_dir, *ca_args])
        assert res.returncode == 0, res.describe()

    def sql(self, statement: str, *args):
        """Runs one statement on the server's SQLite file, as someone with access to the database would."""
        import sqlite3
        db = sqlite3.connect(self.ca_dir / "sigil.db")
        try:
            db.execute(statement, args)
            db.commit()
        finally:
            db.close()

    def start_shop(self, policy: str) -> tuple[str, Path]:
        """A server, agent node-1 with the web and api identities for this uid, and a policy
        directory holding `policy`; returns the Workload API address and the directory."""
        self.start_server()
        uid = os.getuid()
        self.entry(WEB, "node-1", [f"unix:uid:{uid}"])
        self.entry(API, "node-1", [f"unix:uid:{uid}"])
        self.start_agent("node-1", self.token("node-1"))
        policies = self.root / "policies"
        policies.mkdir()
        (policies / "shop.yaml").write_text(policy)
        return f"unix://{self.socket('node-1')}", policies

    # -- processes

    def start_server(self, extra=()):
        self.server = Proc([self.bin, "server", "run", "--data-dir", self.ca_dir, "--listen", f"127.0.0.1:{self.port}",
                            "--admin-socket", self.admin_socket, *extra], self.root / "server.log")
        wait_for(lambda: self.admin_socket.exists() and "ready" in self.server.output(), 30, "server to listen")
        return self.server

    def stop_server(self):
        if self.server:
            self.server.stop()

    def admin(self, *args, timeout: float = 30):
        return run([self.bin, *args, "--admin-socket", self.admin_socket], timeout=timeout)

    def admin_ok(self, *args) -> str:
        res = self.admin(*args)
        assert res.returncode == 0, res.describe()
        return res.stdout

    def token(self, agent: str, ttl: str = "10m") -> str:
        return self.admin_ok("token", "create", "--agent-id", agent, "--ttl", ttl).strip()

    def entry(self, spiffe_id: str, parent: str, selectors, ttl: str = "1h") -> str:
        args = ["entry", "create", "--spiffe-id", spiffe_id, "--parent", parent, "--ttl", ttl, "--json"]
        for s in selectors:
            args += ["--selector", s]
        import json
        return json.loads(self.admin_ok(*args))["id"]

    def agent_paths(self, name: str):
        d = self.root / f"agent-{name}"
        sock_dir = self.root / f"sock-{name}"
        sock_dir.mkdir(exist_ok=True)
        os.chmod(sock_dir, 0o755)
        return d, sock_dir / "agent.sock"

    def start_agent(self, name: str, token: str | None = None, wait: bool = True, extra=()) -> Proc:
        data, sock = self.agent_paths(name)
        args = [self.bin, "agent", "run", "--server", f"127.0.0.1:{self.port}", "--trust-bundle", self.ca_dir / "bundle.pem",
                "--socket", sock, "--data-dir", data, *extra]
        if token:
            args += ["--join-token", token]
        proc = Proc(args, self.root / f"agent-{name}.log")
        self.agents[name] = proc
        if wait:
            wait_for(lambda: sock.exists() or not proc.alive(), 30, f"agent {name} socket")
            assert proc.alive(), proc.output()
        return proc

    def socket(self, name: str) -> Path:
        return self.agent_paths(name)[1]

    def start_proxy(self, name: str, *args, wait: bool = True, timeout: float = 30) -> Proc:
        """`sigil proxy run ARGS` (log: <root>/proxy-<name>.log), stopped by close(); with wait, returns
        once it logged "proxy ready" (it has an SVID and its listeners are bound)."""
        proc = Proc([self.bin, "proxy", "run", *args], self.root / f"proxy-{name}.log")
        self.proxies[name] = proc
        if wait:
            wait_for(lambda: "proxy ready" in proc.output() or not proc.alive(), timeout, f"proxy {name} to be ready")
            assert proc.alive(), f"proxy {name} exited:\n{proc.output()}"
        return proc

    def stop_proxy(self, name: str) -> int | None:
        proc = self.proxies.pop(name, None)
        return proc.stop() if proc else None

    def close(self):
        for proc in list(self.proxies.values()):
            proc.stop()
        self.proxies.clear()
        for proc in self.agents.values():
            proc.stop()
        if self.server:
            self.server.stop()
        if not os.environ.get("SIGIL_KEEP"):  # SIGIL_KEEP=1 keeps logs and spools for a failed run
            shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- proxy ledgers

HASH_SUFFIX = ',"hash":"'


def ledger_rows(path: Path) -> list[dict]:
    """The complete rows of a proxy's JSON-lines ledger spool (a line still being written is skipped)."""
    if not Path(path).exists():
        return []
    text = Path(path).read_text()
    lines = text.split("\n")[:-1]  # the last element is "" or an unterminated line
    return [json.loads(line) for line in lines if line.strip()]


def verify_ledger_chain(path: Path) -> list[dict]:
    """Checks a ledger spool's hash chain and returns its rows: every line ends with
    `,"hash":"<sha256 hex>"}` where the hash is SHA-256 of the line's bytes before that suffix; `prev` is
    the previous row's hash (64 zeros for the first); `seq` counts 1, 2, 3... per writer. A spool that
    was started over after shipping (rotated) begins with a `spool_rotated` row at seq > 1 whose prev
    is the hash of the last shipped row: the chain is checked from there."""
    lines = Path(path).read_bytes().split(b"\n")
    assert lines[-1] == b"", f"{path}: last line not terminated"
    rows = []
    prev, seq = "0" * 64, 0
    for number, raw in enumerate(lines[:-1], 1):
        line = raw.decode()
        cut = line.rfind(HASH_SUFFIX)
        assert cut > 0 and line.endswith('"}'), f"{path}:{number}: no trailing hash: {line[:200]}"
        body, claimed = line[:cut], line[cut + len(HASH_SUFFIX):-2]
        row = json.loads(line)
        assert row["hash"] == claimed
        assert hashlib.sha256(body.encode()).hexdigest() == claimed, f"{path}:{number}: hash does not recompute"
        if number == 1 and row["kind"] == "spool_rotated" and row["seq"] > 1:
            prev, seq = row["prev"], row["seq"] - 1
        assert row["prev"] == prev, f"{path}:{number}: prev {row['prev']} != previous hash {prev}"
        assert row["seq"] == seq + 1, f"{path}:{number}: seq {row['seq']} after {seq}"
        prev, seq = claimed, row["seq"]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- apps behind proxies

class HTTPEchoApp:
    """A plain HTTP/1.1 app on 127.0.0.1 (keep-alive, reads every request body, Content-Length or
    chunked) that answers JSON: path, method, every x-forwarded-client-cert value, body length and
    SHA-256. Counts the requests it saw, so a test can prove a refused caller never reached it."""

    def __init__(self, port: int | None = None):
        app = self
        self.count = 0
        self.seen: list[dict] = []
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def read_body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def answer(self):
                body = self.read_body()
                seen = {"path": self.path, "method": self.command, "version": self.request_version,
                        "xfcc": self.headers.get_all("x-forwarded-client-cert") or [],
                        "chunked": "chunked" in (self.headers.get("Transfer-Encoding") or "").lower(),
                        "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
                        "header_names": [k.lower() for k in self.headers.keys()], "client_port": self.client_address[1]}
                with app.lock:
                    app.count += 1
                    app.seen.append(seen)
                size = parse_qs(urlsplit(self.path).query).get("size")
                if size:  # ?size=N: N bytes of a fixed pattern instead of the JSON echo
                    out = HTTPEchoApp.pattern(int(size[0]))
                else:
                    out = json.dumps(seen).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream" if size else "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def pattern(size: int) -> bytes:
        block = bytes(range(256)) * 256
        return (block * (size // len(block) + 1))[:size]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class TCPEchoServer:
    """A raw TCP echo server on 127.0.0.1; counts the connections it accepted."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        """One accepted connection, on its own thread (subclasses answer differently)."""
        self._echo(conn)

    @staticmethod
    def _echo(conn: socket.socket):
        conn.settimeout(30)
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


class StreamingApp(TCPEchoServer):
    """A raw HTTP/1.1 app on 127.0.0.1 that answers every request with `size` bytes of one pattern
    (Content-Length, 64 KiB writes) and reads every request body as it comes (reading stops while
    `reading` is clear). A request to `/early` is answered after a second with `413` (keep-alive)
    and its body is never read: the connection just waits until the app is closed. Counts request heads
    and the bytes it has sent and received, so a test can tell how far ahead of a slow peer the
    proxy let the other side get."""

    def __init__(self, size: int):
        self.size = size
        self.sent = 0
        self.received = 0
        self.heads = 0
        self.reading = threading.Event()
        self.reading.set()
        self.stopped = threading.Event()
        super().__init__()

    def _serve(self, conn: socket.socket):
        conn.settimeout(60)
        block = bytes(range(256)) * 256
        with conn:
            try:
                data = b""
                while True:
                    got = read_request_head(conn, data)
                    if got is None:
                        return
                    head, data = got
                    self.heads += 1
                    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                    left = int(match.group(1)) - len(data) if match else 0
                    self.received += len(data)
                    data = b""
                    if head.split(b" ", 2)[1].startswith(b"/early"):
                        time.sleep(1)  # the body piles up in the proxy's queues towards the app first
                        conn.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 5\r\n\r\nlarge")
                        self.stopped.wait()
                        return
                    while left > 0:
                        self.reading.wait()
                        chunk = conn.recv(min(65536, left))
                        if not chunk:
                            return
                        self.received += len(chunk)
                        left -= len(chunk)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: %d\r\n\r\n" % self.size)
                    sent = 0
                    while sent < self.size:
                        n = min(len(block), self.size - sent)
                        conn.sendall(block[:n])
                        sent += n
                        self.sent += n
            except OSError:
                return

    def close(self):
        self.stopped.set()
        self.reading.set()
        super().close()
