"""`sigil demo`, the README's first command, end to end: a real server, agent, two apps behind two
proxies on loopback; an allowed call, a denied one, a refused plaintext one, and the server's
copy of both ledgers verified and drawn as who-called-whom."""
from __future__ import annotations

import re
import shutil

from interop_util import run

WEB = "spiffe://demo.sigil/ns/shop/sa/web"
API = "spiffe://demo.sigil/ns/shop/sa/api"


def test_demo_runs_the_whole_system_and_the_audit_sees_it(sigil_bin, tmp_path):
    res = run([sigil_bin, "demo"], timeout=180, cwd=tmp_path)
    assert res.returncode == 0, res.describe()
    out = res.stdout
    assert f'"caller":"{WEB}"' in out and "403 RBAC: access denied" in out
    assert "refused: connection closed before any response" in out
    assert re.search(r"ledger intact: \d+ rows from 3 writers, every chain verified", out), out
    # the callee's view: healthz, /api/orders and /admin from web over mTLS (one denied), and the
    # refused plaintext caller
    assert f"{WEB} -> {API}  3  1  100.0%" in out, out
    assert f"(plaintext) -> {API}  1  1  0.0%" in out, out
    work = re.search(r"files and logs are in (\S+)", out).group(1)
    shutil.rmtree(work, ignore_errors=True)


def demo_processes(work) -> list[int]:
    """PIDs of processes whose command line names the demo's directory (what it started)."""
    import os
    from pathlib import Path
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(work).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return [p for p in found if p != os.getpid()]


import pytest  # noqa: E402


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_a_demo_stopped_while_starting_leaves_nothing_running(sigil_bin, tmp_path, signal_name):
    """A signal while the demo is still starting (SIGTERM, or SIGHUP from a closed terminal) stops
    everything it started; its children run in process groups of their own, and used to be left
    running (owned by init) when the demo ended that way."""
    import signal
    import subprocess
    import time
    from cluster import wait_for
    work = tmp_path / "demo"
    proc = subprocess.Popen([sigil_bin, "demo", "--dir", work, "--keep-running"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (work / "server.log").exists(), 60, "the demo to start its server")
        proc.send_signal(getattr(signal, signal_name))
        assert proc.wait(60) == 128 + getattr(signal, signal_name)
        wait_for(lambda: not demo_processes(work), 30, "every process of the demo to end", interval=0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in demo_processes(work):
            try:
                import os
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
