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
