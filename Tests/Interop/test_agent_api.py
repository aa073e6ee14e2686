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
