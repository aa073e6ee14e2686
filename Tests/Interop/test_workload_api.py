"""The agent's SPIFFE Workload API driven by real outside clients: the PyPI `spiffe` package
(py-spiffe) and raw grpcio calls against SPIFFE's own compiled descriptor."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cluster import TRUST_DOMAIN, Cluster, served_cluster, wait_for

spiffe = pytest.importorskip("spiffe")
from spiffe import WorkloadApiClient  # noqa: E402
from spiffe._proto import workload_pb2, workload_pb2_grpc  # noqa: E402

WEB = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/web"
NOBODY = 65534


@pytest.fixture
def cluster(sigil_bin):
    with served_cluster(sigil_bin) as c:
        yield c


@pytest.fixture
def node(cluster):
    """Agent node-1 attested, with an entry for this test process's uid."""
    cluster.entry(WEB, "node-1", [f"unix:uid:{os.getuid()}"], ttl="20s")
    cluster.start_agent("node-1", cluster.token("node-1"))
    return cluster


def client_for(cluster, name="node-1") -> WorkloadApiClient:
    return WorkloadApiClient(socket_path=f"unix://{cluster.socket(name)}")


def verify_chain(svid, roots):
    """Leaf signed by the next certificate, up to a root of the bundle."""
    chain = list(svid.cert_chain)
    anchors = {r.subject.rfc4514_string(): r for r in roots}
    for child, parent in zip(chain, chain[1:]):
        child.verify_directly_issued_by(parent)
    top = chain[-1]
    root = anchors.get(top.issuer.rfc4514_string())
    assert root is not None, "chain does not end under a bundle root"
    top.verify_directly_issued_by(root)


def test_py_spiffe_fetches_x509_svid_bundles_and_jwt(node):
    with client_for(node) as client:
        svid = wait_for(lambda: client.fetch_x509_svid(timeout=5), 30, "first X509-SVID")
        assert str(svid.spiffe_id) == WEB
        # the private key belongs to the leaf
        leaf_pub = svid.leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        key_pub = svid.private_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert leaf_pub == key_pub
        bundles = client.fetch_x509_bundles(timeout=5)
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        roots = list(bundle.x509_authorities)
        expected_roots = x509.load_pem_x509_certificates((node.ca_dir / "bundle.pem").read_bytes())
        assert {r.fingerprint(r.signature_hash_algorithm) for r in roots} == {r.fingerprint(r.signature_hash_algorithm) for r in expected_roots}
        verify_chain(svid, roots)
        # JWT-SVID: fetched, then accepted by ValidateJWTSVID for its audience only
        jwt_svid = client.fetch_jwt_svid(audience={"spiffe://example.org/ns/default/sa/api"})
        assert str(jwt_svid.spiffe_id) == WEB
        validated = client.validate_jwt_svid(jwt_svid.token, "spiffe://example.org/ns/default/sa/api")
        assert str(validated.spiffe_id) == WEB
        with pytest.raises(Exception):
            client.validate_jwt_svid(jwt_svid.token, "spiffe://example.org/ns/other/sa/x")
        jwt_bundles = client.fetch_jwt_bundles()
        assert jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain) is not None


def test_sigil_svid_fetch_takes_endpoint_addresses(node, sigil_bin):
    """`--socket` and SPIFFE_ENDPOINT_SOCKET take the Workload Endpoint forms (unix:///path,
    unix:/path); a TCP or relative address is refused with its reason, not tried as a file."""
    sock = node.socket("node-1")

    def fetch(args, env=None):
        return subprocess.run([sigil_bin, "svid", "fetch", *args], capture_output=True, text=True, timeout=30,
                              env={**os.environ, **(env or {})})

    first = wait_for(lambda: (r := fetch(["--socket", f"unix://{sock}"])).returncode == 0 and r, 30, "an SVID via unix:///")
    assert WEB in first.stdout
    via_env = fetch([], env={"SPIFFE_ENDPOINT_SOCKET": f"unix:{sock}"})
    assert via_env.returncode == 0 and WEB in via_env.stdout, via_env.stderr
    upper = fetch(["--socket", f"UNIX://{sock}"])  # a URI scheme is case-insensitive
    assert upper.returncode == 0 and WEB in upper.stdout, upper.stderr
    # --write uses spire-agent's names (svid.0.pem, svid.0.key, bundle.0.pem); keys are 0600
    out = node.root / "written"
    written = fetch(["--socket", str(sock), "--write", str(out)])
    assert written.returncode == 0, written.stderr
    for name in ["svid.0.pem", "svid.0.key", "bundle.0.pem", "svid.pem", "svid.key", "bundle.pem"]:
        assert (out / name).exists(), name
    assert (out / "svid.0.key").stat().st_mode & 0o777 == 0o600
    assert (out / "svid.0.pem").read_bytes() == (out / "svid.pem").read_bytes()
    for bad, why in [("tcp://127.0.0.1:1", "TCP address"), ("unix:agent.sock", "relative path"), ("http://x", "scheme 'http:'"),
                     (f"unix://{sock}?x=1", "query or fragment")]:
        res = fetch(["--socket", bad])
        assert res.returncode != 0 and why in res.stderr, (bad, res.returncode, res.stderr)
        assert "Traceback" not in res.stderr and "Fatal error" not in res.stderr


def test_rotated_svid_arrives_on_the_stream(node):
    """TTL 20 s: the agent renews at about 10 s; the open stream must see a new serial well
    within one rotation period after the first."""
    serials = []
    errors = []
    with client_for(node) as client:
        first = wait_for(lambda: client.fetch_x509_svid(timeout=5), 30, "first X509-SVID")
        handle = client.stream_x509_contexts(
            on_success=lambda ctx: serials.append(ctx.default_svid.leaf.serial_number),
            on_error=lambda e: errors.append(e), retry_connect=False)
        try:
            wait_for(lambda: len(set(serials)) >= 2, 25, "a rotated SVID on the stream")
        finally:
            handle.cancel()
    assert not errors, errors
    assert len(set(serials)) >= 2
    assert first.leaf.serial_number in serials or len(set(serials)) >= 2


def grpc_fetch(sock, metadata=(("workload.spiffe.io", "true"),)):
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=list(metadata), timeout=10)
        return next(iter(stream))
    finally:
        channel.close()


def test_missing_security_header_is_invalid_argument(node):
    wait_for(lambda: grpc_fetch(node.socket("node-1")), 30, "agent serving")
    with pytest.raises(grpc.RpcError) as info:
        grpc_fetch(node.socket("node-1"), metadata=())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_caller_whose_uid_matches_no_entry_is_permission_denied(cluster):
    """Only uid 4242 is entitled on this node; this process (another uid) asks, with grpcio,
    and even claims uid 4242 in a header of the agent's reserved prefix: denied."""
    cluster.entry(WEB, "node-1", ["unix:uid:4242"])
    cluster.start_agent("node-1", cluster.token("node-1"))
    sock = cluster.socket("node-1")
    assert os.getuid() != 4242
    def denied():
        try:
            grpc_fetch(sock, metadata=(("workload.spiffe.io", "true"), ("x-sigil-caller-selectors", "unix:uid:4242")))
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.PERMISSION_DENIED
        raise AssertionError("got an SVID for a uid this caller does not have")
    assert wait_for(denied, 30, "PermissionDenied")


def test_unprivileged_uid_gets_only_its_own_identity(cluster, sigil_bin):
    """A real second uid (65534) on the same node, through `sigil svid fetch`: entitled to nothing
    but its own entry."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a process as another uid")
    if not all(os.access(p, os.X_OK) for p in [sigil_bin] + [str(q) for q in Path(sigil_bin).parents]):
        pytest.skip("sigil binary not reachable by other users")
    other = f"spiffe://{TRUST_DOMAIN}/ns/batch/sa/nobody"
    cluster.entry(WEB, "node-1", [f"unix:uid:{os.getuid()}"])
    cluster.start_agent("node-1", cluster.token("node-1"))
    sock = cluster.socket("node-1")
    wait_for(lambda: grpc_fetch(sock), 30, "agent serving")
    def as_nobody():
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    def fetch():
        return subprocess.run([str(sigil_bin), "svid", "fetch", "--socket", str(sock), "--json"], capture_output=True, text=True,
                              timeout=60, preexec_fn=as_nobody, cwd="/tmp")
    first = fetch()
    assert first.returncode == 1 and "PermissionDenied" in first.stderr, first.stdout + first.stderr
    cluster.entry(other, "node-1", [f"unix:uid:{NOBODY}"])
    def served():
        r = fetch()
        return r.returncode == 0 and r
    r = wait_for(served, 30, "the nobody entry to reach the agent", interval=0.2)
    ids = [s["spiffe_id"] for s in __import__("json").loads(r.stdout)]
    assert ids == [other]


def first_cert(chain_der: bytes) -> x509.Certificate:
    """The leaf of a Workload API `x509_svid` (DER certificates concatenated)."""
    assert chain_der[0] == 0x30
    n = chain_der[1]
    if n < 0x80:
        end = 2 + n
    else:
        k = n & 0x7F
        end = 2 + k + int.from_bytes(chain_der[2:2 + k], "big")
    return x509.load_der_x509_certificate(chain_der[:end])


def test_agent_serves_from_cache_while_server_is_down_and_resumes(node):
    sock = node.socket("node-1")
    before = wait_for(lambda: grpc_fetch(sock), 30, "first SVID")
    serial_before = first_cert(before.svids[0].x509_svid).serial_number
    node.stop_server()
    # Longer than a rotation period (~10 s): the agent keeps answering from what it holds.
    time.sleep(12)
    during = grpc_fetch(sock)
    assert during.svids and during.svids[0].spiffe_id == WEB
    node.start_server()
    def rotated():
        r = grpc_fetch(sock)
        cert = first_cert(r.svids[0].x509_svid)
        return cert.serial_number != serial_before and cert.not_valid_after_utc.timestamp() > time.time()
    wait_for(rotated, 30, "rotation to resume after the server returned", interval=0.5)


def test_join_tokens_are_single_use_and_expire(cluster, sigil_bin):
    token = cluster.token("node-a")
    first = cluster.start_agent("node-a", token)
    assert first.alive()
    # the same token again, for a second agent: refused, non-zero exit, the server's reason
    second = cluster.start_agent("node-b", token, wait=False)
    assert second.p.wait(60) != 0
    assert "used" in second.output(), second.output()
    expired = cluster.token("node-c", ttl="1s")
    time.sleep(2)
    third = cluster.start_agent("node-c", expired, wait=False)
    assert third.p.wait(60) != 0
    assert "expired" in third.output(), third.output()
    unknown = cluster.start_agent("node-d", "0" * 64, wait=False)
    assert unknown.p.wait(60) != 0
    assert "unknown" in unknown.output(), unknown.output()
    # every refusal is on record
    db = sqlite3.connect(f"file:{cluster.ca_dir / 'sigil.db'}?mode=ro", uri=True)
    details = [row[0] for row in db.execute("SELECT detail FROM issuance_log WHERE event = 'join_token_refused'")]
    assert sorted(details) == ["join token expired", "join token unknown", "join token used"]


def test_restart_with_cached_agent_svid_needs_no_token(node):
    sock = node.socket("node-1")
    wait_for(lambda: grpc_fetch(sock), 30, "first SVID")
    node.agents["node-1"].stop()
    restarted = node.start_agent("node-1", token=None)
    assert restarted.alive()
    r = wait_for(lambda: grpc_fetch(sock), 30, "SVID after restart")
    assert r.svids[0].spiffe_id == WEB


def test_workloads_keep_fresh_svids_past_the_agents_own_svid_lifetime(sigil_bin):
    """Agent SVIDs of 20 s and workload SVIDs of 10 s: well past the agent's first SVID, the workload
    still receives unexpired SVIDs (the agent renews itself and its connections carry the new one)."""
    c = Cluster(sigil_bin)
    try:
        c.start_server(extra=["--agent-svid-ttl", "20s"])
        c.entry(WEB, "node-1", [f"unix:uid:{os.getuid()}"], ttl="10s")
        c.start_agent("node-1", c.token("node-1"))
        sock = c.socket("node-1")
        wait_for(lambda: grpc_fetch(sock), 30, "first SVID")
        time.sleep(45)
        agent = c.agents["node-1"]
        for _ in range(3):
            try:
                r = grpc_fetch(sock)
            except grpc.RpcError as e:  # show why: the agent's and the server's own words
                raise AssertionError(f"fetch failed: {e}\n--- agent ---\n{agent.output()[-4000:]}\n"
                                     f"--- server ---\n{c.server.output()[-3000:]}") from e
            leaf = first_cert(r.svids[0].x509_svid)
            assert leaf.not_valid_after_utc.timestamp() > time.time(), "served an expired SVID while the server was up"
            time.sleep(2)
        assert c.agents["node-1"].alive(), c.agents["node-1"].output()
        assert "agent SVID renewed" in c.agents["node-1"].output()
    finally:
        c.close()


def fetch_jwt(sock, audience, timeout=60):
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        return stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[audience]),
                                 metadata=[("workload.spiffe.io", "true")], timeout=timeout).svids[0].svid
    finally:
        channel.close()


def test_published_spiffe_bundle_verifies_jwt_svids(node, sigil_bin):
    """JWT-SVID spec 6: the trust domain's SPIFFE bundle carries its JWT signing keys (use
    jwt-svid), so a relying party holding only the published bundle can verify a JWT-SVID."""
    import json
    from spiffe import JwtBundle, JwtSvid, TrustDomain
    token = wait_for(lambda: fetch_jwt(node.socket("node-1"), "spiffe://example.org/ns/default/sa/api"), 30, "a JWT-SVID")
    for source in (["--admin-socket", node.admin_socket], ["--data-dir", node.ca_dir]):
        res = subprocess.run([sigil_bin, "bundle", "show", "--format", "spiffe", *source], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        uses = sorted(k["use"] for k in json.loads(res.stdout)["keys"])
        assert "jwt-svid" in uses and "x509-svid" in uses, uses
        # py-spiffe reads a JWKS of JWT keys (it does not skip other uses): the bundle's jwt-svid part
        jwt_keys = [k for k in json.loads(res.stdout)["keys"] if k["use"] == "jwt-svid"]
        bundle = JwtBundle.parse(TrustDomain("example.org"), json.dumps({"keys": jwt_keys}).encode())
        svid = JwtSvid.parse_and_validate(token, bundle, {"spiffe://example.org/ns/default/sa/api"})
        assert str(svid.spiffe_id) == WEB


def test_jwt_svids_are_reused_and_a_stalled_server_is_unavailable_not_a_hang(node):
    """A JWT-SVID is reused while more than half its life remains (as SPIRE's agent does), so a
    workload keeps getting it while the server is away; a new one that needs a server that has
    stopped answering is Unavailable (retry), not a call that never returns."""
    import signal
    sock = node.socket("node-1")
    first = wait_for(lambda: fetch_jwt(sock, "spiffe://example.org/ns/default/sa/api"), 30, "a JWT-SVID")
    node.server.p.send_signal(signal.SIGSTOP)
    try:
        assert fetch_jwt(sock, "spiffe://example.org/ns/default/sa/api") == first
        with pytest.raises(grpc.RpcError) as info:
            fetch_jwt(sock, "spiffe://example.org/ns/default/sa/other", timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        node.server.p.send_signal(signal.SIGCONT)


def test_the_default_svid_is_the_oldest_registration_and_stays_so(node):
    """The first SVID of a Workload API answer is the default (what a client, or a proxy without
    --spiffe-id, uses). It is the caller's oldest registration, so registering another identity
    for the same workload does not switch it (the order used to follow random entry IDs)."""
    sock = node.socket("node-1")
    wait_for(lambda: grpc_fetch(sock).svids[0].spiffe_id == WEB, 30, "the first SVID")
    others = [f"spiffe://{TRUST_DOMAIN}/ns/default/sa/extra-{i}" for i in range(6)]
    for other in others:
        node.entry(other, "node-1", [f"unix:uid:{os.getuid()}"])
    wait_for(lambda: len(grpc_fetch(sock).svids) == 1 + len(others), 60, "every SVID", interval=0.5)
    assert [s.spiffe_id for s in grpc_fetch(sock).svids] == [WEB, *others]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_grpc_server_reflection_describes_the_workload_api(node, version):
    """Workload Endpoint spec, section 7: endpoints SHOULD support gRPC Server Reflection, so that
    generic tools (grpcurl, grpc_cli) can call the Workload API without its .proto. Both names tools
    use are served; the descriptors are SPIFFE's workload.proto (no package, as real clients need)."""
    from google.protobuf import descriptor_pb2
    # grpcio-reflection ships the v1alpha messages; v1's are the same on the wire.
    from grpc_reflection.v1alpha import reflection_pb2 as pb
    sock = node.socket("node-1")
    wait_for(lambda: grpc_fetch(sock), 30, "agent serving")
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=pb.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=pb.ServerReflectionResponse.FromString)
        requests = [pb.ServerReflectionRequest(list_services=""),
                    pb.ServerReflectionRequest(file_containing_symbol="SpiffeWorkloadAPI"),
                    pb.ServerReflectionRequest(file_containing_symbol="X509SVIDRequest"),
                    pb.ServerReflectionRequest(file_by_filename="workload.proto"),
                    pb.ServerReflectionRequest(file_containing_symbol="NoSuchThing")]
        answers = list(call(iter(requests), timeout=30))
    finally:
        channel.close()
    assert len(answers) == len(requests)
    services = {s.name for s in answers[0].list_services_response.service}
    assert "SpiffeWorkloadAPI" in services and f"grpc.reflection.{version}.ServerReflection" in services, services
    for answer in answers[1:4]:
        files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in answer.file_descriptor_response.file_descriptor_proto]
        assert files[0].name == "workload.proto" and files[0].package == "", [f.name for f in files]
        assert "google/protobuf/struct.proto" in {f.name for f in files}  # its import comes along
        (service,) = files[0].service
        assert {m.name for m in service.method} >= {"FetchX509SVID", "FetchX509Bundles", "FetchJWTSVID",
                                                    "FetchJWTBundles", "ValidateJWTSVID"}
    assert answers[4].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_an_open_reflection_stream_does_not_hold_up_the_agents_shutdown(node):
    """grpcui and Go's grpcreflect keep one reflection stream open for their whole life; SIGTERM
    must still stop the agent (a graceful shutdown waits for open RPCs, so it used to hang)."""
    import signal
    import threading
    from grpc_reflection.v1alpha import reflection_pb2 as pb
    sock = node.socket("node-1")
    wait_for(lambda: grpc_fetch(sock), 30, "agent serving")
    channel = grpc.insecure_channel(f"unix://{sock}")
    release = threading.Event()

    def requests():
        yield pb.ServerReflectionRequest(list_services="")
        release.wait(60)  # keeps the stream open, as a long-lived client does

    call = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                 request_serializer=pb.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=pb.ServerReflectionResponse.FromString)
    answers = call(requests(), timeout=60)
    try:
        assert next(answers).list_services_response.service
        agent = node.agents["node-1"]
        agent.p.send_signal(signal.SIGTERM)
        assert agent.p.wait(30) == 0, agent.output()[-2000:]
    finally:
        release.set()
        channel.close()


# --------------------------------------------------------------------------- a full --data-dir
# A small tmpfs over the agent's --data-dir, filled up: needs root and mount(2); skipped otherwise.

from interop_util import fill, small_tmpfs  # noqa: E402


def agent_svids_issued(c: Cluster, agent: str) -> int:
    db = sqlite3.connect(f"file:{c.ca_dir / 'sigil.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM issued_certificates WHERE spiffe_id = ?",
                          (f"spiffe://{TRUST_DOMAIN}/sigil/agent/{agent}",)).fetchone()[0]
    finally:
        db.close()


def test_agent_with_a_full_data_dir_outlives_its_own_svid_and_saves_it_later(sigil_bin):
    """Agent SVIDs of 20 s on a data dir that fills up after attesting: the renewed SVID cannot be
    saved, so the agent holds it in memory, retries only the save (the server signs about one per
    half-life, not one per retry), switches to it before the current one expires, and keeps serving
    well past two lifetimes. Once there is space the SVID in use is saved, and a restart needs no token."""
    c = Cluster(sigil_bin)
    data = c.agent_paths("node-1")[0]
    try:
        with small_tmpfs(data):
            c.start_server(extra=["--agent-svid-ttl", "20s"])
            c.entry(WEB, "node-1", [f"unix:uid:{os.getuid()}"], ttl="10s")
            agent = c.start_agent("node-1", c.token("node-1"))
            sock = c.socket("node-1")
            wait_for(lambda: grpc_fetch(sock), 30, "first SVID")
            issued_before = agent_svids_issued(c, "node-1")
            filler = fill(data)
            time.sleep(45)
            assert agent.alive(), agent.output()
            r = grpc_fetch(sock)
            assert first_cert(r.svids[0].x509_svid).not_valid_after_utc.timestamp() > time.time()
            log = agent.output()
            assert "No space left on device" in log, log
            assert "held in memory only" in log and "would need a new --join-token" in log, log
            # 45 s at 20 s: a handful of renewals, not one every retry.
            assert agent_svids_issued(c, "node-1") - issued_before <= 7, log
            assert not list(data.glob("*.tmp")), sorted(p.name for p in data.iterdir())
            filler.unlink()
            wait_for(lambda: "saved now" in agent.output(), 30, "the SVID in use saved")
            assert agent.stop() == 0
            restarted = c.start_agent("node-1", token=None)
            wait_for(lambda: grpc_fetch(sock), 30, "SVID after a restart without a token")
            assert restarted.alive(), restarted.output()
            c.close()
    finally:
        c.close()
        import shutil
        shutil.rmtree(c.root, ignore_errors=True)


def test_agent_first_start_on_a_full_data_dir_keeps_the_join_token(sigil_bin):
    """A full --data-dir is found before attesting: the agent exits naming the directory and the
    error, and the same single-use token works once there is space."""
    c = Cluster(sigil_bin)
    data = c.agent_paths("node-1")[0]
    try:
        with small_tmpfs(data, size="64k"):
            c.start_server()
            token = c.token("node-1")
            filler = fill(data)
            agent = c.start_agent("node-1", token, wait=False)
            wait_for(lambda: not agent.alive(), 30, "the agent to exit")
            assert agent.p.returncode != 0
            out = agent.output()
            assert str(data) in out and "No space left on device" in out, out
            assert "agent attested" not in c.server.output(), c.server.output()
            assert not [p for p in data.iterdir() if p.name not in ("filler", ".agent.lock")], sorted(p.name for p in data.iterdir())
            filler.unlink()
            again = c.start_agent("node-1", token)
            assert again.alive(), again.output()
            assert "attested" in again.output(), again.output()
            c.close()
    finally:
        c.close()
        import shutil
        shutil.rmtree(c.root, ignore_errors=True)
