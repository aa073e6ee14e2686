"""The server's own ledger rows and ledger retention, end to end with real processes and a real
SQLite file: every certificate the CA issues or refuses, every join token and attestation is a
hash-chained row of writer spiffe://<td>/sigil/server that `sigil audit verify` checks; with
`--ledger-retention` old rows go, a signed checkpoint stays where each chain was cut, and verify
still proves the rest intact (and names a forged checkpoint)."""
from __future__ import annotations

import json
import os
import sqlite3

import pytest

from cluster import WEB, Cluster, wait_for
from interop_util import run

SERVER = "spiffe://example.org/sigil/server"


def audit(c: Cluster, *args):
    return run([c.bin, "audit", *args, "--data-dir", c.ca_dir], timeout=60)


def rows(c: Cluster, *filters) -> list[dict]:
    res = audit(c, "query", "--json", "--limit", "100000", *filters)
    assert res.returncode == 0, res.describe()
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


@pytest.fixture
def cluster(sigil_bin):
    c = Cluster(sigil_bin)
    try:
        yield c
    finally:
        c.close()


def test_what_the_ca_did_and_refused_is_chained_and_verified(cluster):
    c = cluster
    c.start_server()
    c.entry(WEB, "node-1", [f"unix:uid:{os.getuid()}"])
    c.start_agent("node-1", c.token("node-1"))
    wait_for(lambda: any(r["destination"] == WEB for r in rows(c, "--kind", "certificate_issued")), 30, "the workload SVID's row")
    # a refused join token ends its agent; the server records the refusal
    bad = c.start_agent("node-2", "not-a-token", wait=False)
    bad.p.wait(timeout=30)
    assert bad.p.returncode != 0

    mine = [r for r in rows(c) if r["writer"] == SERVER]
    kinds = [r["kind"] for r in mine]
    assert kinds[0] == "ca_initialized" and [r["seq"] for r in mine] == list(range(1, len(mine) + 1))
    for kind in ("join_token_created", "agent_attested", "entry_created", "certificate_issued", "join_token_refused"):
        assert kind in kinds, kinds
    issued = [r for r in mine if r["kind"] == "certificate_issued"]
    web = next(r for r in issued if r["destination"] == WEB)
    assert web["decision"] == "allow" and web["source"] == "spiffe://example.org/sigil/agent/node-1"
    assert web["peer_serial"] and "validity" in web["detail"] and "authority" in web["detail"]
    assert next(r for r in mine if r["kind"] == "join_token_refused")["decision"] == "deny"
    res = audit(c, "verify")
    assert res.returncode == 0 and "ledger intact" in res.stdout, res.describe()

    # one byte of one of the server's rows: verify names it
    c.stop_server()
    (line,) = sqlite3.connect(c.ca_dir / "sigil.db").execute(
        "SELECT line FROM ledger_rows WHERE writer = ? AND seq = ?", (SERVER, web["seq"])).fetchone()
    edited = bytes(line).replace(b'"decision":"allow"', b'"decision":"allov"', 1)
    assert edited != bytes(line)
    c.sql("UPDATE ledger_rows SET line = ? WHERE writer = ? AND seq = ?", edited, SERVER, web["seq"])
    res = audit(c, "verify")
    assert res.returncode == 1 and f"writer {SERVER} row seq {web['seq']}:" in res.stdout and "edited" in res.stdout, res.describe()


def test_retention_removes_old_rows_and_leaves_a_signed_checkpoint(cluster):
    c = cluster
    c.start_server(extra=["--ledger-retention", "4s"])
    c.entry(WEB, "node-1", [f"unix:uid:{os.getuid()}"])
    c.token("node-1")
    first = rows(c)
    assert first and first[0]["seq"] == 1

    def cut():
        db = sqlite3.connect(c.ca_dir / "sigil.db")
        try:
            (seq,) = db.execute("SELECT MAX(seq) FROM ledger_checkpoints WHERE writer = ?", (SERVER,)).fetchone()
            return seq is not None and seq >= first[-1]["seq"]
        finally:
            db.close()

    wait_for(cut, 30, "a retention pass to cut the server's chain", interval=0.5)
    c.stop_server()
    kept = [r for r in rows(c) if r["writer"] == SERVER]
    assert all(r["seq"] > first[-1]["seq"] for r in kept), "rows older than the retention period are still there"
    assert any(r["kind"] == "ledger_pruned" for r in kept)
    res = audit(c, "verify")
    assert res.returncode == 0 and "ledger intact" in res.stdout and "signed retention checkpoint" in res.stdout, res.describe()
    assert json.loads(audit(c, "verify", "--json").stdout)["checkpoints"] >= 1

    # a checkpoint edited to hide a different chain: its signature fails, named
    c.sql("UPDATE ledger_checkpoints SET hash = ? WHERE writer = ?", "0" * 64, SERVER)
    res = audit(c, "verify")
    assert res.returncode == 1 and f"writer {SERVER}" in res.stdout and "not validly signed" in res.stdout, res.describe()

    # without the checkpoint key the cut cannot be proven: verify says so instead of passing
    os.rename(c.ca_dir / "keys" / "ledger-checkpoint.key.pem", c.root / "moved.key.pem")
    res = audit(c, "verify")
    assert res.returncode == 1 and "cannot be checked" in res.stdout, res.describe()


def test_a_bad_retention_value_is_a_usage_error(cluster):
    c = cluster
    res = run([c.bin, "server", "run", "--data-dir", c.ca_dir, "--ledger-retention", "forever",
               "--admin-socket", c.root / "x.sock", "--listen", "127.0.0.1:0"], timeout=30)
    assert res.returncode == 2 and "--ledger-retention" in res.stderr, res.describe()
