"""The who-called-whom ledger end to end: two proxies ship their spools to a real server over mTLS
while calls flow; the server is killed (SIGKILL) and restarted twice and the callee proxy is
killed (SIGKILL) and restarted once under load; then every call a client saw complete is in the server's store exactly
once, `sigil audit verify` passes, and editing or deleting a stored row makes it fail naming the
row. Real processes, real sockets, a real SQLite file."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import sqlite3
import threading
import time

import pytest

from cluster import API, API_FROM_WEB, WEB, Cluster, HTTPEchoApp, wait_for
from interop_util import free_port, run

POLICIES = API_FROM_WEB + '    to: [{operation: {notPaths: ["/admin*"]}}]\n'


class Load:
    """Keep-alive HTTP/1.1 calls through the caller's outbound proxy on a few threads; counts the
    calls whose whole response arrived, by expected status."""

    def __init__(self, port: int, threads: int = 3):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.completed = {200: 0, 403: 0}
        self.failed = 0
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, index: int):
        conn = None
        n = 0
        while not self.stop.is_set():
            n += 1
            path = f"/admin/{index}-{n}" if n % 10 == 0 else f"/orders/{index}-{n}"
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                with self.lock:
                    if resp.status in self.completed:
                        self.completed[resp.status] += 1
                    else:
                        self.failed += 1
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.failed += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    def finish(self) -> dict:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=20)
        return dict(self.completed)


def audit(c: Cluster, *args, ok: bool = True):
    res = run([c.bin, "audit", *args, "--data-dir", c.ca_dir], timeout=60)
    if ok:
        assert res.returncode == 0, res.describe()
    return res


def stored_rows(c: Cluster, *filters) -> list[dict]:
    res = audit(c, "query", "--json", "--limit", "10000000", *filters)
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def shipped(sigil_bin):
    """A cluster with two proxy pairs, all four shipping to the server, run through the outage scenario."""
    c = Cluster(sigil_bin)
    app = HTTPEchoApp()
    try:
        sock, policies = c.start_shop(POLICIES)
        api_in, web_out = free_port(), free_port()
        server = f"127.0.0.1:{c.port}"

        def start_api():
            return c.start_proxy("api", "--workload-api", sock, "--spiffe-id", API, "--inbound", f"127.0.0.1:{api_in}",
                                 "--app", app.address, "--namespace", "shop", "--labels", "app=api", "--policies", policies,
                                 "--mtls", "STRICT", "--ledger", c.root / "api.jsonl", "--ledger-server", server)

        start_api()
        c.start_proxy("web", "--workload-api", sock, "--spiffe-id", WEB, "--inbound", f"127.0.0.1:{free_port()}",
                      "--app", f"127.0.0.1:{free_port()}", "--namespace", "shop", "--labels", "app=web", "--policies", policies,
                      "--outbound", f"127.0.0.1:{web_out}", "--upstream", f"127.0.0.1:{api_in}", "--upstream-id", API,
                      "--ledger", c.root / "web.jsonl", "--ledger-server", server)
        # A second pair (other replicas of the same two services: their own proxies, spools and writers).
        api2_in, web2_out = free_port(), free_port()
        c.start_proxy("api2", "--workload-api", sock, "--spiffe-id", API, "--inbound", f"127.0.0.1:{api2_in}",
                      "--app", app.address, "--namespace", "shop", "--labels", "app=api", "--policies", policies,
                      "--mtls", "STRICT", "--ledger", c.root / "api2.jsonl", "--ledger-server", server)
        c.start_proxy("web2", "--workload-api", sock, "--spiffe-id", WEB, "--inbound", f"127.0.0.1:{free_port()}",
                      "--app", f"127.0.0.1:{free_port()}", "--namespace", "shop", "--labels", "app=web", "--policies", policies,
                      "--outbound", f"127.0.0.1:{web2_out}", "--upstream", f"127.0.0.1:{api2_in}", "--upstream-id", API,
                      "--ledger", c.root / "web2.jsonl", "--ledger-server", server)
        load, load2 = Load(web_out), Load(web2_out, threads=2)
        seconds = float(os.environ.get("SIGIL_LEDGER_LOAD_SECONDS", "24"))
        step = seconds / 5  # the timeline below is 5 steps long
        time.sleep(step)
        for _ in range(2):  # the server dies without warning, twice; rows wait in the spools
            os.kill(c.server.p.pid, signal.SIGKILL)
            c.server.p.wait(timeout=10)
            time.sleep(step)
            c.start_server()
            time.sleep(step / 2)
        # The callee's proxy is killed without warning (SIGKILL) under load and restarted: every
        # response it sent had its row in the spool file already, and its chain continues.
        c.proxies.pop("api").kill()
        start_api()
        time.sleep(step)
        first, second = load.finish(), load2.finish()
        completed = {status: first[status] + second[status] for status in first}
        yield c, completed, load.failed + load2.failed
    finally:
        c.close()
        app.close()


def test_every_completed_call_is_stored_once_after_server_kills(shipped):
    c, completed, failed = shipped
    assert completed[200] > 50 and completed[403] > 5, (completed, failed)

    want = completed[200] + completed[403]
    try:
        wait_for(lambda: len([r for r in stored_rows(c, "--to", API, "--kind", "request") if r["status"] in (200, 403)]) >= want,
                 45, f"{want} completed calls in the server's ledger", interval=0.5)
    except AssertionError:
        pass  # the assertions below say what is missing
    rows = stored_rows(c)
    keys = [(r["writer"], r["seq"]) for r in rows]
    assert len(keys) == len(set(keys)), "a row was stored twice"
    inbound = [r for r in rows if r["kind"] == "request" and r["destination"] == API]
    by_status = {s: sum(1 for r in inbound if r["status"] == s) for s in (200, 403)}
    # Calls the client saw fail (the callee's proxy restarting) may have a row with the status the
    # proxy sent; no completed call may be missing.
    assert by_status[200] >= completed[200] and by_status[403] >= completed[403], (by_status, completed)
    assert by_status[200] + by_status[403] <= want + failed, (by_status, completed, failed)
    assert all(r["source"] == WEB and r["mtls"] and r["peer_serial"] and r["source_ip"] == "127.0.0.1" for r in inbound)
    assert {r["decision"] for r in inbound if r["status"] == 403} == {"deny"}
    # all four proxies' chains arrived (a caller's outbound writes its own rows), and the server's own
    assert len({r["writer"] for r in rows}) >= 5
    res = audit(c, "verify")
    assert "ledger intact" in res.stdout, res.describe()
    print(f"completed calls {completed}, failed {failed}; stored request rows by status {by_status}; "
          f"{len(rows)} rows from {len({r['writer'] for r in rows})} writers, 0 duplicates; {res.stdout.strip()}")


def test_query_and_graph_answer_who_called_whom(shipped):
    c, completed, _ = shipped
    denied = stored_rows(c, "--to", API, "--decision", "deny", "--kind", "request")
    assert denied and all(r["path"].startswith("/admin") for r in denied)
    res = audit(c, "query", "--from", WEB, "--decision", "deny", "--limit", "3")
    lines = res.stdout.splitlines()
    assert len(lines) == 3 and all(f"{WEB} -> {API}" in l and " deny 403 mtls" in l for l in lines), res.stdout
    assert not stored_rows(c, "--since", "2020-01-01T00:00:00Z", "--until", "2020-01-02T00:00:00Z")
    edges = json.loads(audit(c, "graph", "--format", "json").stdout)
    edge = next(e for e in edges if e.get("source") == WEB and e["destination"] == API)
    assert edge["calls"] >= completed[200] + completed[403] and edge["denied"] >= completed[403]
    assert edge["overMTLS"] == edge["calls"]
    dot = audit(c, "graph", "--format", "dot").stdout
    assert dot.startswith("digraph") and f'"{WEB}" -> "{API}"' in dot and "color=red" in dot
    bad = audit(c, "query", "--since", "yesterday", ok=False)
    assert bad.returncode != 0 and "--since" in bad.stderr


def test_policy_replay_matches_recorded_decisions_and_names_what_a_candidate_changes(shipped, tmp_path):
    c, _, _ = shipped
    rows = [r for r in stored_rows(c) if r["kind"] == "request"]
    allowed = sum(1 for r in rows if r["decision"] == "allow")
    denied = sum(1 for r in rows if r["decision"] == "deny")
    assert allowed and denied

    # the policies that were in force: every recorded decision is what a fresh evaluation gives
    same = audit_policy(c, "--policies", c.root / "policies")
    assert same.returncode == 0, same.describe()
    summary = json.loads(audit_policy(c, "--policies", c.root / "policies", "--json").stdout)
    assert summary["replayed"] >= allowed + denied and summary["unchanged"] == summary["replayed"] and summary["changes"] == []

    # a candidate that drops the notPaths exclusion: exactly the recorded /admin denials flip
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "p.yaml").write_text(POLICIES.replace('    to: [{operation: {notPaths: ["/admin*"]}}]\n', ""))
    res = audit_policy(c, "--policies", loose, "--json", "--limit", "100000")
    assert res.returncode == 1, res.describe()
    summary = json.loads(res.stdout)
    assert summary["denyToAllow"] == denied and summary["allowToDeny"] == 0
    assert {ch["path"].split("/")[1] for ch in summary["changes"]} == {"admin"}
    assert all(ch["recorded"] == "deny" and ch["candidate"] == "allow" for ch in summary["changes"])

    # a candidate that only allows another caller: every recorded allow flips, named by policy
    other = tmp_path / "other"
    other.mkdir()
    (other / "p.yaml").write_text(POLICIES.replace("sa/web", "sa/other"))
    text = audit_policy(c, "--policies", other, "--limit", "2")
    assert text.returncode == 1
    assert f"allow -> deny" in text.stdout and f"{allowed} allow -> deny, 0 deny -> allow" in text.stdout, text.stdout
    bad = audit_policy(c, "--policies", tmp_path / "missing")
    assert bad.returncode == 2 and "policy load error" in bad.stderr


def test_compliance_report_in_markdown_and_html(shipped):
    c, completed, _ = shipped
    md = audit(c, "report", "--since", "1d").stdout
    assert md.startswith("# Sigil compliance report: trust domain example.org")
    assert "Intact: " in md and "every chain is continuous" in md
    assert f"| {WEB} | {API} |" in md  # the edge
    assert f"| {WEB} |" in md and f"| {API} |" in md  # identities
    section = md.split("## Plaintext edges")[1].split("##")[0]
    assert "None: every recorded call was over mTLS" in section
    denials = md.split("## Denials by policy")[1].split("##")[0]
    assert "no ALLOW rule matched" in denials and "/admin" in denials
    issued = md.split("## Certificates issued")[1].split("##")[0]
    assert f"| {WEB} |" in issued and f"| {API} |" in issued and "| 1h |" in issued
    assert "## Kill switch\n\nNot used in the period." in md
    html = audit(c, "report", "--since", "1d", "--format", "html").stdout
    assert html.startswith("<!doctype html>") and "<h2>Who called whom</h2>" in html and f"<td>{WEB}</td>" in html
    assert audit(c, "report", "--format", "pdf", ok=False).returncode == 2


def audit_policy(c: Cluster, *args):
    return run([c.bin, "policy", "replay", "--since", "1d", "--data-dir", c.ca_dir, *args], timeout=60)


@pytest.mark.parametrize("case", ["server-chain", "whole-writer-with-checkpoint"])
def test_deleting_a_whole_chain_breaks_verify(shipped, tmp_path, case):
    """Deleting every row and the head of a chain: the server's own (its issuance log still
    holds what the chain recorded), or a writer a retention checkpoint names. Both used to
    verify as intact."""
    c, _, _ = shipped
    copy = tmp_path / "ca"
    shutil.copytree(c.ca_dir, copy, ignore=shutil.ignore_patterns("*.sock", "sigil.db*"))
    source, target = sqlite3.connect(c.ca_dir / "sigil.db"), sqlite3.connect(copy / "sigil.db")
    source.backup(target)
    source.close()
    if case == "server-chain":
        writer = "spiffe://example.org/sigil/server"
    else:
        (writer,) = target.execute("SELECT writer FROM ledger_writers WHERE writer LIKE 'proxy:%' ORDER BY writer LIMIT 1").fetchone()
        target.execute("INSERT INTO ledger_checkpoints (writer, seq, hash, rows_removed, cutoff_us, made_at_us, key_id, signature) "
                       "VALUES (?, 1, ?, 1, 0, 0, 'k', x'00')", (writer, "0" * 64))
    target.execute("DELETE FROM ledger_rows WHERE writer = ?", (writer,))
    target.execute("DELETE FROM ledger_writers WHERE writer = ?", (writer,))
    target.commit()
    target.close()
    res = run([c.bin, "audit", "verify", "--data-dir", copy], timeout=60)
    assert res.returncode == 1 and writer in res.stdout + res.stderr, res.describe()
    assert "deleted" in res.stdout + res.stderr, res.describe()


def test_editing_or_deleting_a_stored_row_breaks_verify_and_names_it(shipped):
    c, _, _ = shipped
    c.stop_server()
    rows = stored_rows(c, "--to", API, "--kind", "request")
    target = rows[len(rows) // 2]
    writer, seq = target["writer"], target["seq"]
    db = sqlite3.connect(c.ca_dir / "sigil.db")
    (line,) = db.execute("SELECT line FROM ledger_rows WHERE writer = ? AND seq = ?", (writer, seq)).fetchone()
    db.close()
    original = bytes(line)

    # one byte of the row's bytes: "allow" -> "allov" (or a digit of the duration)
    edited = original.replace(b'"decision":"allow"', b'"decision":"allov"', 1) if b'"allow"' in original \
        else original.replace(b'"duration_us":', b'"duration_us":9', 1)
    assert edited != original and len(edited) >= len(original)
    c.sql("UPDATE ledger_rows SET line = ? WHERE writer = ? AND seq = ?", edited, writer, seq)
    res = audit(c, "verify", ok=False)
    assert res.returncode == 1 and f"writer {writer} row seq {seq}:" in res.stdout and "edited" in res.stdout, res.describe()
    c.sql("UPDATE ledger_rows SET line = ? WHERE writer = ? AND seq = ?", original, writer, seq)
    assert "ledger intact" in audit(c, "verify").stdout

    # an indexed column alone (what a query filters on) no longer matches the row
    flipped = "allow" if target["decision"] == "deny" else "deny"
    c.sql("UPDATE ledger_rows SET decision = ? WHERE writer = ? AND seq = ?", flipped, writer, seq)
    res = audit(c, "verify", ok=False)
    assert f"row seq {seq}:" in res.stdout and "decision column" in res.stdout, res.describe()
    c.sql("UPDATE ledger_rows SET decision = ? WHERE writer = ? AND seq = ?", target["decision"], writer, seq)

    # a deleted row: the next row names the gap
    c.sql("DELETE FROM ledger_rows WHERE writer = ? AND seq = ?", writer, seq)
    res = audit(c, "verify", ok=False)
    assert res.returncode == 1 and f"writer {writer} row seq {seq + 1}:" in res.stdout and f"seq {seq} missing" in res.stdout, res.describe()
    verdict = json.loads(audit(c, "verify", "--json", ok=False).stdout)
    assert verdict["intact"] is False and verdict["breaks"][0]["seq"] == seq + 1

    # the proxies' own spools still verify (the store was tampered with, not the source)
    spools = [str(c.root / f"{name}.jsonl") for name in ("api", "web", "api2", "web2")]
    res = audit(c, "verify", *sum((["--spool", s] for s in spools), []))
    assert "ledger intact" in res.stdout, res.describe()
