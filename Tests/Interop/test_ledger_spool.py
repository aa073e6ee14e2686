"""The proxy's ledger spool is bounded: a proxy whose spool reaches --ledger-max-size fails closed
(503 "ledger spool full", over HTTP/1.1 and HTTP/2, without reaching the app), says so once in
its log and in its Prometheus metrics; a proxy that ships its spool starts it over once the server
has every row (--ledger-segment-size), and the chain goes on across the rotation and a restart.
Real processes, real sockets, real files."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from cluster import API, API_FROM_WEB, WEB, Cluster, HTTPEchoApp, verify_ledger_chain, wait_for
from interop_util import free_port, run

POLICIES = API_FROM_WEB


@pytest.fixture
def cluster(sigil_bin):
    """A server, an agent with the web and api identities, and a policy directory."""
    c = Cluster(sigil_bin)
    app = HTTPEchoApp()
    try:
        sock, policies = c.start_shop(POLICIES)
        yield c, app, sock, policies
    finally:
        c.close()
        app.close()


def start_pair(c: Cluster, app: HTTPEchoApp, sock: str, policies, api_extra=(), api_in: int | None = None,
               web_out: int | None = None, spool=None):
    """api (inbound, in front of the echo app, PERMISSIVE so plaintext h2 can reach it) and web
    (outbound to api); returns the two ports."""
    api_in = api_in or free_port()
    web_out = web_out or free_port()
    c.start_proxy("api", "--workload-api", sock, "--spiffe-id", API, "--inbound", f"127.0.0.1:{api_in}",
                  "--app", app.address, "--namespace", "shop", "--labels", "app=api", "--policies", policies,
                  "--mtls", "PERMISSIVE", "--ledger", spool or c.root / "api.jsonl", *api_extra)
    if "web" not in c.proxies:
        c.start_proxy("web", "--workload-api", sock, "--spiffe-id", WEB, "--inbound", f"127.0.0.1:{free_port()}",
                      "--app", f"127.0.0.1:{free_port()}", "--namespace", "shop", "--labels", "app=web",
                      "--policies", policies, "--outbound", f"127.0.0.1:{web_out}", "--upstream", f"127.0.0.1:{api_in}",
                      "--upstream-id", API)
    return api_in, web_out


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def scrape(port: int) -> dict[str, float]:
    status, body = get(port, "/metrics")
    assert status == 200
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_a_full_spool_fails_closed_with_503_one_alarm_and_a_metric(cluster):
    c, app, sock, policies = cluster
    metrics = free_port()
    api_in, web_out = start_pair(c, app, sock, policies,
                                 api_extra=("--ledger-max-size", "20000", "--metrics", f"127.0.0.1:{metrics}"))
    before = scrape(metrics)
    assert before["sigil_proxy_ledger_spool_full"] == 0

    served, refused = 0, 0
    for i in range(200):
        status, body = get(web_out, f"/fill/{i}")
        if status == 200:
            served += 1
            assert refused == 0, "a request was served after the spool was full"
        else:
            assert (status, body) == (503, b"ledger spool full"), (status, body)
            refused += 1
    assert served > 10 and refused > 10, (served, refused)
    # The app saw only what was recorded: every served request has its row, no refused one reached it.
    spool = c.root / "api.jsonl"
    rows = verify_ledger_chain(spool)
    assert spool.stat().st_size <= 20000
    requests = [r for r in rows if r["kind"] == "request"]
    assert len(requests) == served and app.count == served, (len(requests), served, app.count)

    # HTTP/2 (plaintext, prior knowledge: the proxy is PERMISSIVE) is refused the same way.
    if shutil.which("curl"):
        res = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_code} %{http_version}",
                              f"http://127.0.0.1:{api_in}/h2"], capture_output=True, text=True, timeout=30)
        assert res.stdout.endswith("\n503 2"), res
        assert res.stdout.startswith("ledger spool full"), res
        refused += 1
    assert app.count == served

    after = scrape(metrics)
    assert after["sigil_proxy_ledger_spool_full"] == 1
    assert after["sigil_proxy_ledger_refused_requests_total"] == refused
    assert after['sigil_proxy_requests_total{decision="allow"}'] == served
    assert after["sigil_proxy_ledger_rows_total"] == len(rows)
    assert 0 < after["sigil_proxy_ledger_spool_bytes"] <= 20000
    log = c.proxies["api"].output()
    assert log.count("ledger spool full: new requests are refused") == 1, log
    assert "ledger spool full" not in c.proxies["web"].output()
    print(f"served {served}, refused {refused} (503), spool {spool.stat().st_size} bytes, {len(rows)} rows")


def test_a_shipped_spool_is_rotated_and_the_chain_goes_on_across_a_restart(cluster):
    c, app, sock, policies = cluster
    server = f"127.0.0.1:{c.port}"
    extra = ("--ledger-server", server, "--ledger-segment-size", "8KiB")
    api_in, web_out = start_pair(c, app, sock, policies, api_extra=extra)
    spool = c.root / "api.jsonl"

    def stored() -> list[dict]:
        """The api proxy's rows in the server's store (every kind)."""
        res = run([c.bin, "audit", "query", "--json", "--limit", "1000000", "--data-dir", c.ca_dir], timeout=60)
        assert res.returncode == 0, res.describe()
        rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
        return [r for r in rows if r["writer"].startswith("proxy:shop/app=api@")]

    for i in range(120):
        assert get(web_out, f"/orders/{i}")[0] == 200
    wait_for(lambda: len([r for r in stored() if r["kind"] == "request"]) >= 120, 60, "120 rows on the server", interval=0.5)
    # Everything is shipped and the spool is over a segment: it starts over with a spool_rotated row.
    wait_for(lambda: spool.stat().st_size < 8192 and verify_ledger_chain(spool)[0]["kind"] == "spool_rotated", 30,
             "the spool to be rotated", interval=0.2)
    first = verify_ledger_chain(spool)[0]
    assert first["seq"] > 1 and "were shipped to the server" in first["detail"]
    res = run([c.bin, "audit", "verify", "--spool", spool], timeout=60)
    assert res.returncode == 0 and f"begins at seq {first['seq']} after rotation" in res.stdout, res.describe()

    # A restart (SIGKILL) reads the chain's tail from the rotated spool and goes on.
    c.proxies.pop("api").kill()
    start_pair(c, app, sock, policies, api_extra=extra, api_in=api_in, web_out=web_out)
    for i in range(30):
        assert get(web_out, f"/after/{i}")[0] == 200
    wait_for(lambda: len([r for r in stored() if r["kind"] == "request"]) >= 150, 60, "150 rows on the server", interval=0.5)
    rows = verify_ledger_chain(spool)
    seqs = sorted(r["seq"] for r in stored())
    assert seqs == list(range(1, len(seqs) + 1)), "the server's chain for api has a gap or a duplicate"
    assert rows[-1]["seq"] <= seqs[-1]
    res = run([c.bin, "audit", "verify", "--data-dir", c.ca_dir], timeout=60)
    assert res.returncode == 0 and "ledger intact" in res.stdout, res.describe()
    kinds = [r["kind"] for r in stored()]
    assert kinds.count("spool_rotated") >= 1
    # Tampering is still caught: a spool whose first row is not a rotation must start at seq 1.
    cut = c.root / "cut.jsonl"
    cut.write_bytes(b"".join(spool.read_bytes().splitlines(keepends=True)[1:]))
    if cut.stat().st_size:
        bad = run([c.bin, "audit", "verify", "--spool", cut], timeout=60)
        assert bad.returncode == 1 and "missing" in bad.stdout, bad.describe()
    print(f"rotated at seq {first['seq']}; server rows 1..{seqs[-1]}; spool now {spool.stat().st_size} bytes")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs of its own (root only: skipped where mounting is not permitted)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount permission")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_fails_closed_before_any_served_row_is_lost(cluster, small_disk):
    """The spool reserves disk blocks ahead of its end, so a filesystem that fills up turns it FULL
    (503) while the rows of requests already admitted still fit on disk: after 16 clients ran the
    disk full and the proxy was killed (SIGKILL), every response a client saw complete has its row
    in the file. (Before, the rows in flight waited in memory while their responses went out, and
    the kill lost them.)"""
    c, app, sock, policies = cluster
    spool = small_disk / "api.jsonl"
    metrics = free_port()
    _, web_out = start_pair(c, app, sock, policies, api_extra=("--metrics", f"127.0.0.1:{metrics}"), spool=spool)
    served, lock, stop = [], threading.Lock(), threading.Event()

    def client(k: int):
        i = 0
        while not stop.is_set() and i < 20_000:
            i += 1
            try:
                status, _ = get(web_out, f"/w{k}/{i}")
            except OSError:
                continue
            if status == 200:
                with lock:
                    served.append(f"/w{k}/{i}")
            elif status == 503:
                stop.set()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert stop.is_set(), "the disk never filled"
    values = scrape(metrics)
    assert values["sigil_proxy_ledger_spool_full"] == 1 and values["sigil_proxy_ledger_spool_held_rows"] == 0, values
    proxy = c.proxies.pop("api")
    log = proxy.output()
    proxy.kill()
    rows = verify_ledger_chain(spool)
    recorded = {r["path"] for r in rows if r["kind"] == "request"}
    missing = [p for p in served if p not in recorded]
    assert served and not missing, f"{len(missing)} of {len(served)} served responses have no row: {missing[:5]}"
    assert "no room for the spool's reserve" in log


def test_a_torn_last_row_is_cut_back_and_the_chain_goes_on(cluster):
    """A proxy that died in the middle of writing a row leaves part of it at the end of the spool:
    at the next start the fragment is cut back (logged) and the chain continues from the last whole
    row. (Before, the next row was glued onto the fragment and the chain restarted at seq 1.)"""
    c, app, sock, policies = cluster
    _, web_out = start_pair(c, app, sock, policies)
    for i in range(5):
        assert get(web_out, f"/before/{i}")[0] == 200
    spool = c.root / "api.jsonl"
    wait_for(lambda: sum(1 for r in verify_ledger_chain(spool) if r["kind"] == "request") >= 5, 10, "five request rows")
    proxy = c.proxies.pop("api")
    args = proxy.args[3:]
    proxy.kill()
    whole = spool.read_bytes()
    last_seq = json.loads(whole.rstrip(b"\n").rsplit(b"\n", 1)[-1])["seq"]
    spool.write_bytes(whole + whole.rstrip(b"\n").rsplit(b"\n", 1)[-1][:150])  # part of one more row
    c.start_proxy("api", *args)
    for i in range(3):
        assert get(web_out, f"/after/{i}")[0] == 200
    wait_for(lambda: sum(1 for r in verify_ledger_chain(spool) if r["kind"] == "request") >= 8, 10, "the rows after the restart")
    rows = verify_ledger_chain(spool)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)) and rows[-1]["seq"] > last_seq
    assert "cut back to its last whole row" in c.proxies["api"].output()
    res = run([c.bin, "audit", "verify", "--spool", spool])
    assert res.returncode == 0 and "ledger intact" in res.stdout, res.describe()
