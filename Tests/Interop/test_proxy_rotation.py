"""Rotation under load: SVIDs with a 30 s TTL rotate (about every 15 s) and the CA's signing
intermediate, made with a 60 s life, rotates on the server's schedule (prepared at 1/2 of its
life, active at 5/6: every 30 s from 50 s on) while clients loop requests through a real proxy
pair for three minutes. Nothing may fail, the inbound proxy's ledger must hold exactly one row per
request the clients made, and at the end every workload's SVID chains to the active intermediate."""
from __future__ import annotations

import http.client
import json
import os
import threading
import time
from pathlib import Path

from cryptography import x509

from cluster import API, API_FROM_WEB, WEB, Cluster, Proc, wait_for
from interop_util import free_port, run

SECONDS = int(os.environ.get("SIGIL_ROTATION_SECONDS", "180"))
POLICY = API_FROM_WEB


def ledger_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rotation_under_load_drops_nothing(sigil_bin):
    c = Cluster(sigil_bin, ca_args=["--ca-ttl", "60s"])
    procs: list[Proc] = []
    try:
        c.start_server()
        uid = os.getuid()
        c.entry(WEB, "node-1", [f"unix:uid:{uid}"], ttl="30s")
        c.entry(API, "node-1", [f"unix:uid:{uid}"], ttl="30s")
        c.start_agent("node-1", c.token("node-1"))
        policies = c.root / "policies"
        policies.mkdir()
        (policies / "api.yaml").write_text(POLICY)
        app, api_in, web_in, web_out = free_port(), free_port(), free_port(), free_port()
        ledger = c.root / "api-ledger.jsonl"
        sock = f"unix://{c.socket('node-1')}"
        procs.append(Proc([c.bin, "demo", "app", "--name", "api", "--listen", f"127.0.0.1:{app}"], c.root / "app.log"))
        procs.append(Proc([c.bin, "proxy", "run", "--workload-api", sock, "--spiffe-id", API, "--inbound", f"127.0.0.1:{api_in}",
                           "--app", f"127.0.0.1:{app}", "--namespace", "shop", "--labels", "app=api", "--policies", policies,
                           "--mtls", "STRICT", "--ledger", ledger], c.root / "api-proxy.log"))
        procs.append(Proc([c.bin, "proxy", "run", "--workload-api", sock, "--spiffe-id", WEB, "--inbound", f"127.0.0.1:{web_in}",
                           "--app", f"127.0.0.1:{free_port()}", "--namespace", "shop", "--labels", "app=web", "--policies", policies,
                           "--outbound", f"127.0.0.1:{web_out}", "--upstream", f"127.0.0.1:{api_in}", "--upstream-id", API],
                          c.root / "web-proxy.log"))

        def ready():
            conn = http.client.HTTPConnection("127.0.0.1", web_out, timeout=5)
            conn.request("GET", "/warmup")
            return conn.getresponse().status == 200
        wait_for(ready, 60, "the proxy pair to answer", interval=0.2)

        made = [0, 0]
        failures: list[str] = []
        stop = time.monotonic() + SECONDS

        def client(slot: int):
            conn = None
            n = 0
            while time.monotonic() < stop:
                if conn is None or n % 25 == 0:  # a mix of reused and new connections (new handshakes)
                    if conn:
                        conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", web_out, timeout=10)
                n += 1
                made[slot] += 1
                try:
                    conn.request("GET", f"/r/{slot}/{n}")
                    response = conn.getresponse()
                    body = response.read()
                    if response.status != 200 or b'"caller":"' + WEB.encode() + b'"' not in body:
                        failures.append(f"{slot}/{n}: {response.status} {body[:120]!r}")
                except Exception as error:  # noqa: BLE001 - every failure counts
                    failures.append(f"{slot}/{n}: {error!r}")
                    conn.close()
                    conn = None
            if conn:
                conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = sum(made)
        assert failures == [], f"{len(failures)} of {total} requests failed: {failures[:5]}"

        def rows_complete():
            rows = [r for r in ledger_rows(ledger) if r["kind"] == "request" and r["path"].startswith("/r/")]
            return rows if len(rows) >= total else None
        rows = wait_for(rows_complete, 10, "the ledger to catch up", interval=0.2)
        assert len(rows) == total, f"ledger has {len(rows)} rows for {total} requests"
        assert len({r["path"] for r in rows}) == total, "duplicate ledger rows"
        assert all(r["decision"] == "allow" and r["status"] == 200 and r["source"] == WEB for r in rows)

        # The rotations really happened: both identities were re-served several times.
        served = [r for r in ledger_rows(ledger) if r["kind"] == "identity"]
        expected = max(2, SECONDS // 30)
        assert len(served) >= expected, f"the api proxy served only {len(served)} SVIDs in {SECONDS}s"
        peer_serials = {r["peer_serial"] for r in rows}
        assert len(peer_serials) >= expected, f"the caller's certificate rotated only {len(peer_serials)} times"
        # The intermediate rotated on schedule, and every workload ends on the active one's chain.
        def status():
            res = run([c.bin, "ca", "status", "--data-dir", c.ca_dir, "--json"])
            assert res.returncode == 0, res.describe()
            return json.loads(res.stdout)["authorities"]
        intermediates = [a for a in status() if a["kind"] == "intermediate"]
        activated = [a for a in intermediates if a["state"] != "prepared"]
        assert len(activated) - 1 >= max(1, (SECONDS - 50) // 30), f"only {len(activated) - 1} scheduled rotations: {intermediates}"
        assert any(a["state"] == "removed" for a in intermediates), "no old intermediate was removed after its SVIDs expired"

        def on_active_chain():
            active = next(a["id"] for a in status() if a["kind"] == "intermediate" and a["state"] == "active")
            out = c.root / "fetched"
            res = run([c.bin, "svid", "fetch", "--socket", c.socket("node-1"), "--write", out])
            assert res.returncode == 0, res.describe()
            issuers = set()
            for pem in out.glob("svid*.pem"):
                chain = x509.load_pem_x509_certificates(pem.read_bytes())
                issuers.add(chain[1].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex())
            return issuers == {active}
        wait_for(on_active_chain, 40, "every workload SVID to chain to the active intermediate", interval=1)
        print(f"\n{total} requests through the pair in {SECONDS}s, 0 failed; {len(rows)} ledger rows; "
              f"{len(served)} api SVIDs served, {len(peer_serials)} web certificates seen; "
              f"{len(activated) - 1} intermediate rotations, {sum(a['state'] == 'removed' for a in intermediates)} old intermediates removed")
    finally:
        for p in procs:
            p.stop()
        c.close()


def served_id(port: int) -> str | None:
    """The SPIFFE ID of the certificate the proxy presents on a new handshake (None: refused)."""
    import socket
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as s:
            der = s.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.UniformResourceIdentifier)[0]


def test_an_svid_the_workload_api_withdraws_is_no_longer_served(sigil_bin):
    """Workload API spec 5.2.1: a client SHOULD cease using SVIDs the server redacts. Deleting the
    proxy's entry makes it stop presenting that SVID on new handshakes (it used to keep serving it
    until it expired, an hour by default); registering it again brings it back."""
    from cluster import HTTPEchoApp
    c = Cluster(sigil_bin)
    app = HTTPEchoApp()
    try:
        workload_api, policies = c.start_shop("")
        port = free_port()
        c.start_proxy("api", "--workload-api", workload_api, "--inbound", f"127.0.0.1:{port}", "--app", app.address,
                      "--namespace", "shop", "--labels", "app=api", "--policies", policies, "--mtls", "STRICT", "--spiffe-id", API)
        assert served_id(port) == API
        entries = json.loads(c.admin_ok("entry", "list", "--json"))
        (api_entry,) = [e["id"] for e in entries if e["spiffe_id"] == API]
        c.admin_ok("entry", "delete", api_entry)
        wait_for(lambda: served_id(port) is None, 30, "the withdrawn SVID to stop being served", interval=0.5)
        assert c.proxies["api"].alive()
        c.entry(API, "node-1", [f"unix:uid:{os.getuid()}"])
        wait_for(lambda: served_id(port) == API, 60, "the SVID to be served again", interval=0.5)
    finally:
        c.close()
        app.close()
