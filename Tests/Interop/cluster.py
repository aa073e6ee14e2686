"""A real Sigil cluster on loopback for interop tests: `sigil server run` and `sigil agent run`
as child processes, bounded in time, always stopped by the test that started them."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from interop_util import free_port, run

TRUST_DOMAIN = "example.org"


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
        self.log = open(log, "wb")
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
        return self.log_path.read_text(errors="replace")


class Cluster:
    """One CA server and any number of agents, under a world-traversable temp dir (so that a
    workload running as another uid can reach the agent's socket, as on a real node)."""

    def __init__(self, sigil_bin: Path):
        self.bin = Path(sigil_bin)
        self.root = Path(tempfile.mkdtemp(prefix="sigil-it-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.ca_dir = self.root / "ca"
        self.admin_socket = self.root / "admin" / "admin.sock"
        self.port = free_port()
        self.server: Proc | None = None
        self.agents: dict[str, Proc] = {}
        res = run([self.bin, "ca", "init", "--trust-domain", TRUST_DOMAIN, "--data-dir", self.ca_dir])
        assert res.returncode == 0, res.describe()

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

    def close(self):
        for proc in self.agents.values():
            proc.kill() if proc.p.poll() is None and False else proc.stop()
        if self.server:
            self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)
