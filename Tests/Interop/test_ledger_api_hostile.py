"""The ledger API and the audit commands against a workload that ships crafted rows, found by an
adversarial review. A workload with a valid SVID speaks the ledger API directly (grpcio, the
method's bytes written by hand) and tries to enter calls it did not take part in, rows only the
server writes, rows from the far future, rows that print as several lines, another writer's
chain position, and text that would drive an auditor's terminal or report."""
from __future__ import annotations

import hashlib
import http.client
import json

import grpc
import pytest

from cluster import API, TRUST_DOMAIN, WEB, Cluster, HTTPEchoApp, wait_for
from interop_util import free_port, make_csr, run

GENESIS = "0" * 64
DB = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/db"


def sealed(writer: str, seq: int, prev: str, **fields) -> tuple[bytes, str]:
    """One row as a proxy writes it: compact JSON, `writer` first, then `seq`, `prev`, `hash`."""
    row = {"writer": writer, "source": None, "destination": None, "time": "2026-12-07T20:00:00.000000Z",
           "kind": "request", "decision": "allow", "status": 200, "mtls": True, "duration_us": 1000}
    row.update(fields)
    head = json.dumps(row, separators=(",", ":")).encode()[:-1]
    head += b',"seq":%d,"prev":"%s"' % (seq, prev.encode())
    digest = hashlib.sha256(head).hexdigest()
    return head + b',"hash":"' + digest.encode() + b'"}', digest


def varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


class LedgerClient:
    """`/sigil.v1.LedgerAPI/Append` with an SVID: request field 1 is the writer, 2 the rows."""

    def __init__(self, port: int, bundle: bytes, key: bytes, chain: bytes):
        creds = grpc.ssl_channel_credentials(root_certificates=bundle, private_key=key, certificate_chain=chain)
        self.channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])
        self.rpc = self.channel.unary_unary("/sigil.v1.LedgerAPI/Append", request_serializer=lambda x: x,
                                            response_deserializer=lambda x: x)

    def append(self, writer: str, rows: list[bytes]) -> grpc.StatusCode:
        message = b"\x0a" + varint(len(writer.encode())) + writer.encode()
        for row in rows:
            message += b"\x12" + varint(len(row)) + row
        try:
            self.rpc(message, timeout=20)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()


@pytest.fixture(scope="module")
def env(sigil_bin):
    c = Cluster(sigil_bin)
    clients = []
    try:
        svids = {}
        for name, spiffe_id in (("web", WEB), ("api", API)):
            csr, key = make_csr(c.root, name)
            res = run([c.bin, "ca", "sign", "--data-dir", c.ca_dir, "--csr", csr, "--spiffe-id", spiffe_id], timeout=60)
            assert res.returncode == 0, res.describe()
            svids[name] = (key.read_bytes(), res.stdout.encode())
        c.start_server()
        bundle = (c.ca_dir / "bundle.pem").read_bytes()
        web, api = LedgerClient(c.port, bundle, *svids["web"]), LedgerClient(c.port, bundle, *svids["api"])
        clients += [web, api]
        yield c, web, api
    finally:
        for client in clients:
            client.channel.close()
        c.close()


def stored(c: Cluster, writer: str) -> list[dict]:
    res = run([c.bin, "audit", "query", "--json", "--data-dir", c.ca_dir, "--since", "3650d"])
    assert res.returncode == 0, res.describe()
    return [row for row in map(json.loads, res.stdout.splitlines()) if row["writer"] == writer]


@pytest.mark.parametrize("fields, why", [
    ({"source": WEB, "destination": DB}, "a call the uploader made, shipped as the callee's record"),
    ({"source": "(plaintext)", "destination": WEB}, "a made-up caller"),
    ({"source": "not a spiffe id", "destination": WEB}, "a made-up caller"),
    ({"source": API, "destination": WEB, "mtls": False}, "a SPIFFE caller without mTLS"),
    ({"source": None, "destination": WEB, "mtls": True}, "mTLS without a caller"),
    ({"source": API, "destination": WEB, "decision": "maybe"}, "a decision that is neither allow nor deny"),
    ({"kind": "connection", "source": WEB, "destination": DB, "detail": "not outbound"}, "an outbound call not marked so"),
])
def test_a_workload_ships_only_its_own_record_of_its_calls(env, fields, why):
    """Rows the audit graph would count as some callee's record (found by a review of the audit
    side): the uploader's proxy writes none of them, so the server refuses them."""
    c, web, _ = env
    writer = f"proxy:shop/app=web@7~{abs(hash(why)) % 10**8}"
    row, _ = sealed(writer, 1, GENESIS, **fields)
    assert web.append(writer, [row]) == grpc.StatusCode.PERMISSION_DENIED, why
    assert stored(c, writer) == []


def test_the_callers_own_outbound_record_is_accepted(env):
    c, web, _ = env
    writer = "proxy:shop/app=web@8~outbound"
    row, _ = sealed(writer, 1, GENESIS, kind="connection", source=WEB, destination=API, detail="outbound", status=None)
    assert web.append(writer, [row]) == grpc.StatusCode.OK
    plaintext, _ = sealed(writer, 2, hashlib.sha256(row[:row.rindex(b',"hash"')]).hexdigest(), source=None, destination=WEB, mtls=False)
    assert web.append(writer, [plaintext]) == grpc.StatusCode.OK
    assert len(stored(c, writer)) == 2


def test_a_workload_ships_only_calls_it_took_part_in(env):
    c, web, _ = env
    writer = "proxy:shop/app=web@1~forged"
    forged, _ = sealed(writer, 1, GENESIS, source=API, destination=DB)
    assert web.append(writer, [forged]) == grpc.StatusCode.PERMISSION_DENIED
    own, _ = sealed(writer, 1, GENESIS, source=API, destination=WEB, path="/ok")
    assert web.append(writer, [own]) == grpc.StatusCode.OK
    assert [r["destination"] for r in stored(c, writer)] == [WEB]


@pytest.mark.parametrize("writer, fields", [
    ("proxy:shop/app=web@2", {"kind": "certificate_issued", "detail": "an SVID issued off the books"}),
    (f"spiffe://{TRUST_DOMAIN}/sigil/server/", {"kind": "certificate_issued"}),
    ("proxy:shop/app=web@3", {"destination": WEB, "time": "9999-12-31T00:00:00.000000Z"}),
])
def test_rows_a_proxy_never_writes_are_refused(env, writer, fields):
    c, web, _ = env
    row, _ = sealed(writer, 1, GENESIS, **fields)
    assert web.append(writer, [row]) == grpc.StatusCode.INVALID_ARGUMENT
    assert stored(c, writer) == []


def test_a_row_that_would_print_as_several_lines_is_refused(env):
    c, web, _ = env
    writer = "proxy:shop/app=web@4"
    row, _ = sealed(writer, 1, GENESIS, destination=WEB)
    spread = row.replace(b',"kind"', b',\n"kind"')  # JSON allows the whitespace; the ledger does not
    digest = hashlib.sha256(spread[:spread.rindex(b',"hash"')]).hexdigest()
    spread = spread[:spread.rindex(b',"hash"')] + b',"hash":"' + digest.encode() + b'"}'
    assert web.append(writer, [spread]) == grpc.StatusCode.INVALID_ARGUMENT
    assert stored(c, writer) == []


def test_another_workloads_chain_position_is_not_told(env):
    _, web, api = env
    writer = "proxy:shop/app=api@5~owned"
    row, _ = sealed(writer, 1, GENESIS, source=WEB, destination=API)
    assert api.append(writer, [row]) == grpc.StatusCode.OK
    assert api.append(writer, []) == grpc.StatusCode.OK
    assert web.append(writer, []) == grpc.StatusCode.FAILED_PRECONDITION


def test_recorded_text_cannot_drive_the_auditors_terminal_or_report(env):
    c, web, _ = env
    writer = "proxy:shop/app=web@6"
    row, _ = sealed(writer, 1, GENESIS, source=API, destination=WEB, decision="deny", status=403,
                    path="/ok\u001b[2J\u001b]0;pwned\u0007[click](https://evil.example/)", policy="p|q\n\n# Ledger integrity\n\nIntact (forged)\n\n<script>x</script>")
    assert web.append(writer, [row]) == grpc.StatusCode.OK
    query = run([c.bin, "audit", "query", "--data-dir", c.ca_dir, "--since", "3650d"])
    assert query.returncode == 0 and "\x1b" not in query.stdout and "\x07" not in query.stdout, query.describe()
    assert "/ok\\u{1b}[2J" in query.stdout, query.stdout
    graph = run([c.bin, "audit", "graph", "--data-dir", c.ca_dir, "--since", "3650d"])
    assert graph.returncode == 0 and "\x1b" not in graph.stdout, graph.describe()
    report = run([c.bin, "audit", "report", "--data-dir", c.ca_dir, "--since", "3650d"])
    assert report.returncode == 0, report.describe()
    lines = report.stdout.splitlines()
    assert "Intact (forged)" not in lines and "<script>" not in report.stdout, report.stdout
    assert sum(line.startswith("# ") or line.startswith("## Ledger integrity") for line in lines) <= 2, report.stdout
    # a recorded path stays literal text in the Markdown report: not a link an auditor could follow
    assert "[click](https://evil.example/)" not in report.stdout, report.stdout
    assert "\\[click\\]\\(https://evil.example/\\)" in report.stdout, report.stdout


def test_two_replicas_of_one_workload_keep_separate_chains(sigil_bin):
    """Two replicas (same SPIFFE ID, namespace, labels and inbound port; different addresses, as
    two pods would have) shipping to one server: every call of each is stored. They used to share
    a writer name, and the second replica's rows were dropped as already stored."""
    c = Cluster(sigil_bin)
    app = HTTPEchoApp()
    try:
        workload_api, policies = c.start_shop("")
        port = free_port()
        common = ["--workload-api", workload_api, "--app", app.address, "--namespace", "shop", "--labels", "app=api",
                  "--policies", policies, "--mtls", "PERMISSIVE", "--spiffe-id", API, "--ledger-server", f"127.0.0.1:{c.port}"]
        c.start_proxy("r1", *common, "--inbound", f"127.0.0.1:{port}", "--ledger", c.root / "r1.jsonl")
        c.start_proxy("r2", *common, "--inbound", f"127.0.0.2:{port}", "--ledger", c.root / "r2.jsonl")
        for host, prefix in (("127.0.0.1", "/replica1/"), ("127.0.0.2", "/replica2/")):
            for i in range(3):
                conn = http.client.HTTPConnection(host, port, timeout=10)
                conn.request("GET", f"{prefix}{i}")
                assert conn.getresponse().status == 200
                conn.close()

        def shipped():
            res = run([c.bin, "audit", "query", "--json", "--data-dir", c.ca_dir, "--since", "1h"])
            paths = [json.loads(line).get("path") or "" for line in res.stdout.splitlines()]
            return [sum(p.startswith(prefix) for p in paths) for prefix in ("/replica1/", "/replica2/")]
        wait_for(lambda: shipped() == [3, 3], 30, "both replicas' rows on the server", interval=0.5)
        writers = {(c.root / f"{name}.jsonl.writer").read_text().strip() for name in ("r1", "r2")}
        assert len(writers) == 2 and all(w.startswith(f"proxy:shop/app=api@{port}~") for w in writers), writers
        assert "ledger upload refused" not in c.server.output()
    finally:
        app.close()
        c.close()
