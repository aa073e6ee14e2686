"""The agent API from outside: an attested agent's own SVID used by grpcio over mTLS, to show that an
agent obtains only identities parented to it, that refusals are recorded, and that eviction bites."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from cluster import TRUST_DOMAIN, Cluster, served_cluster, wait_for
from interop_util import make_csr, pem_block

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sigil_pb(tmp_path_factory):
    pytest.importorskip("grpc_tools")
    out = tmp_path_factory.mktemp("pb")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'Sources/SigilRPC/Protos'}", f"--python_out={out}",
                    f"--grpc_python_out={out}", "sigil.proto"], check=True, timeout=120)
    sys.path.insert(0, str(out))
    import sigil_pb2, sigil_pb2_grpc  # noqa: E401
    return sigil_pb2, sigil_pb2_grpc


@pytest.fixture
def cluster(sigil_bin):
    with served_cluster(sigil_bin) as c:
        yield c


def agent_channel(cluster, name):
    identity = json.loads((cluster.agent_paths(name)[0] / "agent.json").read_text())
    chain = "".join(pem_block("CERTIFICATE", bytes(der)) for der in identity["chainDER"])
    key = pem_block("PRIVATE KEY", bytes(identity["keyPKCS8DER"]))
    creds = grpc.ssl_channel_credentials(root_certificates=(cluster.ca_dir / "bundle.pem").read_bytes(),
                                         private_key=key.encode(), certificate_chain=chain.encode())
    return grpc.secure_channel(f"127.0.0.1:{cluster.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])


def test_agent_gets_only_identities_parented_to_it(cluster, sigil_pb, tmp_path):
    pb, pb_grpc = sigil_pb
    mine = cluster.entry(f"spiffe://{TRUST_DOMAIN}/ns/a/sa/mine", "node-1", ["unix:uid:1000"])
    theirs = cluster.entry(f"spiffe://{TRUST_DOMAIN}/ns/b/sa/theirs", "node-2", ["unix:uid:1000"])
    cluster.start_agent("node-1", cluster.token("node-1"))
    wait_for(lambda: (cluster.agent_paths("node-1")[0] / "agent.json").exists(), 30, "agent identity on disk")
    csr, _ = make_csr(tmp_path, "w", "p256")
    from cryptography import x509
    der = x509.load_pem_x509_csr(csr.read_bytes()).public_bytes(__import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER)
    channel = agent_channel(cluster, "node-1")
    try:
        stub = pb_grpc.AgentAPIStub(channel)
        response = stub.SignX509SVIDs(pb.SignX509SVIDsRequest(requests=[
            pb.SVIDRequest(entry_id=mine, csr=der), pb.SVIDRequest(entry_id=theirs, csr=der)]), timeout=30)
    finally:
        channel.close()
    by_id = {r.entry_id: r for r in response.results}
    assert by_id[mine].svid_chain and not by_id[mine].error
    leaf = x509.load_der_x509_certificate(by_id[mine].svid_chain[0])
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [f"spiffe://{TRUST_DOMAIN}/ns/a/sa/mine"]
    assert not by_id[theirs].svid_chain
    assert "not parented" in by_id[theirs].error
    db = sqlite3.connect(f"file:{cluster.ca_dir / 'sigil.db'}?mode=ro", uri=True)
    refused = db.execute("SELECT requester, detail FROM issuance_log WHERE event = 'refused'").fetchall()
    assert any("node-1" in who and theirs in detail for who, detail in refused), refused


def test_unattested_and_evicted_callers_are_refused(cluster, sigil_pb, tmp_path):
    pb, pb_grpc = sigil_pb
    cluster.start_agent("node-1", cluster.token("node-1"))
    wait_for(lambda: (cluster.agent_paths("node-1")[0] / "agent.json").exists(), 30, "agent identity on disk")
    channel = agent_channel(cluster, "node-1")
    stub = pb_grpc.AgentAPIStub(channel)
    stream = stub.Sync(pb.SyncRequest(), timeout=30)
    first = next(iter(stream))
    assert first.bundle
    cluster.admin_ok("agent", "evict", "node-1")
    with pytest.raises(grpc.RpcError) as info:
        stub.SignX509SVIDs(pb.SignX509SVIDsRequest(), timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()
    # the evicted agent process ends with the server's reason
    proc = cluster.agents["node-1"]
    assert proc.p.wait(60) != 0
    assert "evicted" in proc.output()
    # Re-admitting the ID with a new token does not revive the old, pre-eviction SVID.
    cluster.start_agent("node-1-again", cluster.token("node-1"))
    wait_for(lambda: (cluster.agent_paths("node-1-again")[0] / "agent.json").exists(), 30, "new identity on disk")
    old = agent_channel(cluster, "node-1")
    try:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.AgentAPIStub(old).SignX509SVIDs(pb.SignX509SVIDsRequest(), timeout=30)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        old.close()
    new = agent_channel(cluster, "node-1-again")
    try:
        assert pb_grpc.AgentAPIStub(new).SignX509SVIDs(pb.SignX509SVIDsRequest(), timeout=30) is not None
    finally:
        new.close()


def mtls_channel(cluster, chain_pem: bytes, key_pem: bytes):
    creds = grpc.ssl_channel_credentials(root_certificates=(cluster.ca_dir / "bundle.pem").read_bytes(),
                                         private_key=key_pem, certificate_chain=chain_pem)
    return grpc.secure_channel(f"127.0.0.1:{cluster.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])


def stopped_agent_identity(cluster, name):
    """An attested agent's SVID chain and key, with the agent process stopped (so that only this
    test renews it)."""
    cluster.start_agent(name, cluster.token(name))
    path = cluster.agent_paths(name)[0] / "agent.json"
    wait_for(path.exists, 30, "agent identity on disk")
    cluster.agents[name].stop()
    identity = json.loads(path.read_text())
    chain = "".join(pem_block("CERTIFICATE", bytes(der)) for der in identity["chainDER"]).encode()
    return chain, pem_block("PRIVATE KEY", bytes(identity["keyPKCS8DER"])).encode()


def call_code(channel, pb, pb_grpc):
    try:
        pb_grpc.AgentAPIStub(channel).SignX509SVIDs(pb.SignX509SVIDsRequest(), timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()


def test_only_the_current_agent_svid_authenticates(cluster, sigil_pb, tmp_path):
    """As SPIRE's agent authorizer: after the agent renews and uses its new SVID, the old one (say
    from a stolen backup) no longer authenticates. It used to stay valid for its whole lifetime."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    pb, pb_grpc = sigil_pb
    old_chain, old_key = stopped_agent_identity(cluster, "node-1")
    csr, key = make_csr(tmp_path, "renewed", "p256")
    der = x509.load_pem_x509_csr(csr.read_bytes()).public_bytes(Encoding.DER)
    channel = mtls_channel(cluster, old_chain, old_key)
    try:
        renewed = pb_grpc.AgentAPIStub(channel).RenewAgent(pb.RenewAgentRequest(csr=der), timeout=30)
    finally:
        channel.close()
    new_chain = "".join(pem_block("CERTIFICATE", bytes(d)) for d in renewed.svid_chain).encode()
    # Until the renewed SVID is used, the current one still works (a lost answer strands nobody).
    assert call_code(mtls_channel(cluster, old_chain, old_key), pb, pb_grpc) == grpc.StatusCode.OK
    assert call_code(mtls_channel(cluster, new_chain, key.read_bytes()), pb, pb_grpc) == grpc.StatusCode.OK
    assert call_code(mtls_channel(cluster, old_chain, old_key), pb, pb_grpc) == grpc.StatusCode.UNAUTHENTICATED
    assert call_code(mtls_channel(cluster, new_chain, key.read_bytes()), pb, pb_grpc) == grpc.StatusCode.OK


def test_a_certificate_forged_with_a_stolen_signing_key_does_not_authenticate(cluster, sigil_pb):
    """Someone holding the intermediate's key mints an agent certificate that reuses the agent's
    current (public) serial with a key of their own: the server binds callers to the exact
    certificate it issued (its SHA-256), not to a serial, so this is refused."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    pb, pb_grpc = sigil_pb
    chain, _ = stopped_agent_identity(cluster, "node-1")
    leaf, intermediate = x509.load_pem_x509_certificates(chain)[:2]
    key_file = next(p for p in (cluster.ca_dir / "keys").glob("*.key.pem")
                    if serialization.load_pem_private_key(p.read_bytes(), None).public_key().public_numbers()
                    == intermediate.public_key().public_numbers())
    stolen = serialization.load_pem_private_key(key_file.read_bytes(), None)
    mine = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(intermediate.subject)
               .public_key(mine.public_key()).serial_number(leaf.serial_number)
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1)))
    for extension in leaf.extensions:
        if extension.oid != x509.oid.ExtensionOID.SUBJECT_KEY_IDENTIFIER:
            builder = builder.add_extension(extension.value, extension.critical)
    forged = builder.sign(stolen, hashes.SHA256())
    forged_chain = forged.public_bytes(serialization.Encoding.PEM) + intermediate.public_bytes(serialization.Encoding.PEM)
    forged_key = mine.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    assert call_code(mtls_channel(cluster, forged_chain, forged_key), pb, pb_grpc) == grpc.StatusCode.PERMISSION_DENIED


def test_server_logs_a_full_datastore_once_and_again_when_it_recovers(sigil_bin):
    """The server's data dir on a small tmpfs that fills up: admin writes fail with the datastore's
    error (Unavailable), and the server log says so at error level once, not once per call; once
    there is space again a write goes through and the log says the datastore works again."""
    import shutil
    from interop_util import fill, small_tmpfs
    c = Cluster(sigil_bin)
    original = c.root / "ca-original"
    try:
        c.ca_dir.rename(original)
        with small_tmpfs(c.ca_dir, size="4m"):
            shutil.copytree(original, c.ca_dir, dirs_exist_ok=True)
            c.start_server()
            c.token("node-0")
            filler = fill(c.ca_dir)
            failed = []
            for i in range(200):
                res = c.admin("entry", "create", "--spiffe-id", f"spiffe://{TRUST_DOMAIN}/ns/n/sa/s{i}", "--parent", "node-1",
                              "--selector", f"unix:uid:{1000 + i}", "--ttl", "1h")
                if res.returncode != 0:
                    failed.append(res)
                    if len(failed) == 3:
                        break
            assert len(failed) == 3, "the full datastore never refused a write"
            assert all("database or disk is full" in r.stderr for r in failed), failed[0].describe()
            log = c.server.output()
            assert log.count("the datastore is failing") == 1, log[-3000:]
            line = next(l for l in log.splitlines() if "the datastore is failing" in l)
            assert "error" in line.lower() and "database or disk is full" in line, line
            assert "the datastore works again" not in log
            filler.unlink()
            wait_for(lambda: c.admin("token", "create", "--agent-id", "node-2").returncode == 0, 30, "a write once there is space")
            wait_for(lambda: "the datastore works again" in c.server.output(), 10, "the recovery logged")
            assert c.server.output().count("the datastore is failing") == 1
            c.close()
    finally:
        c.close()
        shutil.rmtree(c.root, ignore_errors=True)
