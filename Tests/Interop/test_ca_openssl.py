"""Sigil's CA against OpenSSL: path validation, a real mTLS handshake, and upstream (corporate) CAs."""
from __future__ import annotations

import base64
import json
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from interop_util import (
    WORKLOAD_ID,
    cert_der,
    free_port,
    load_pem_certs,
    make_ca_cert,
    make_csr,
    openssl,
    tree_listing,
)

# --------------------------------------------------------------------------- openssl verify


def verify(ca_file: Path, chain: Path, purpose: str) -> str:
    res = openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", ca_file,
                  "-untrusted", chain, chain, check=False)
    assert res.returncode == 0, res.describe()
    assert f"{chain}: OK" in res.stdout, res.describe()
    return res.stdout


@pytest.mark.parametrize("kind", ["p256", "rsa2048", "p384"])
def test_openssl_csr_signed_by_sigil_verifies_for_client_and_server(ca, sign, kind):
    issued = sign(ca, kind=kind)
    # chain = leaf, intermediate; never the root
    assert len(issued.chain) == 2, issued.chain_pem
    root = load_pem_certs((ca / "bundle.pem").read_text())
    assert cert_der(issued.chain[-1]) not in {cert_der(r) for r in root}
    assert issued.leaf.issuer == issued.intermediate.subject
    for purpose in ("sslclient", "sslserver"):
        verify(ca / "bundle.pem", issued.chain_path, purpose)


def test_openssl_verify_fails_against_another_trust_root(sigil, ca, sign, tmp_path):
    """Control for the test above: the same chain must NOT verify against a different Sigil root."""
    other = tmp_path / "other-ca"
    sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", other)
    issued = sign(ca)
    res = openssl("verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", other / "bundle.pem",
                  "-untrusted", issued.chain_path, issued.chain_path, check=False)
    assert res.returncode != 0, res.describe()
    assert f"{issued.chain_path}: OK" not in res.stdout, res.describe()


def test_sign_out_file_matches_stdout_chain(sigil, ca, tmp_path):
    csr, _ = make_csr(tmp_path, "outfile")
    out = tmp_path / "out.pem"
    res = sigil.sign(ca, csr, WORKLOAD_ID, "--out", out)
    assert res.returncode == 0, res.describe()
    assert "BEGIN CERTIFICATE" not in res.stdout
    chain = load_pem_certs(out.read_text())
    assert len(chain) == 2
    verify(ca / "bundle.pem", out, "sslclient")


# --------------------------------------------------------------------------- real TLS handshake


def split_chain(issued, directory: Path, name: str) -> tuple[Path, Path]:
    leaf, rest = directory / f"{name}.leaf.pem", directory / f"{name}.intermediates.pem"
    blocks = issued.chain_pem.split("-----END CERTIFICATE-----")
    blocks = [b.strip() + "\n-----END CERTIFICATE-----\n" for b in blocks if "BEGIN CERTIFICATE" in b]
    leaf.write_text(blocks[0])
    rest.write_text("".join(blocks[1:]))
    return leaf, rest


class OpenSSLServer:
    """`openssl s_server` on 127.0.0.1, accepting exactly one connection, always terminated."""

    def __init__(self, args: list[str]):
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str] = queue.Queue()
        self.captured: list[str] = []

    def start(self, ready_timeout: float = 20) -> int:
        last = ""
        for _ in range(3):  # a free port can be taken between probing and binding; retry
            port = free_port()
            self.proc = subprocess.Popen(
                ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1", *self.args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            threading.Thread(target=self._pump, daemon=True).start()
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline:
                try:
                    line = self.lines.get(timeout=0.2)
                except queue.Empty:
                    if self.proc.poll() is not None:
                        break
                    continue
                self.captured.append(line)
                if line.startswith("ACCEPT"):
                    return port
            last = "".join(self.captured)
            self.stop()
        raise AssertionError(f"openssl s_server did not start:\n{last}")

    def _pump(self):
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.lines.put(line)

    def output(self, wait: float = 10) -> str:
        """Wait (bounded) for the server to finish its one connection, then return all it printed."""
        if self.proc:
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.1)
        while True:
            try:
                self.captured.append(self.lines.get_nowait())
            except queue.Empty:
                break
        return "".join(self.captured)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def s_client(port: int, *args) -> str:
    res = openssl("s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *args,
                  check=False, input="", timeout=30)
    return res.describe()


@pytest.fixture
def mtls_pair(ca, sign, tmp_path):
    server = sign(ca, "spiffe://example.org/ns/default/sa/server", extra=["--dns", "localhost"], name="server")
    client = sign(ca, "spiffe://example.org/ns/default/sa/client", name="client")
    s_leaf, s_chain = split_chain(server, tmp_path, "server")
    c_leaf, c_chain = split_chain(client, tmp_path, "client")
    return {"server": (s_leaf, s_chain, server.key), "client": (c_leaf, c_chain, client.key)}


def server_args(ca: Path, leaf: Path, chain: Path, key: Path) -> list[str]:
    return ["-cert", str(leaf), "-key", str(key), "-cert_chain", str(chain), "-CAfile", str(ca / "bundle.pem"),
            "-Verify", "1", "-verify_return_error"]


def test_mtls_handshake_between_two_svids(ca, mtls_pair):
    s_leaf, s_chain, s_key = mtls_pair["server"]
    c_leaf, c_chain, c_key = mtls_pair["client"]
    server = OpenSSLServer(server_args(ca, s_leaf, s_chain, s_key))
    try:
        port = server.start()
        out = s_client(port, "-cert", c_leaf, "-key", c_key, "-cert_chain", c_chain,
                       "-CAfile", ca / "bundle.pem", "-verify_return_error", "-verify_hostname", "localhost")
        assert "Verify return code: 0 (ok)" in out, out
        assert "BEGIN CERTIFICATE" in out  # the server presented a certificate
        srv = server.output()
        # the server verified and received the client's SVID
        assert "Client certificate" in srv, srv
        assert "1 server accepts that finished" in srv, srv
        assert "verify error" not in srv.lower(), srv
        assert "certificate verify failed" not in srv, srv
    finally:
        server.stop()


def test_mtls_server_rejects_client_from_another_ca(sigil, ca, mtls_pair, sign, tmp_path):
    """Control: a client SVID from another root must be refused by the -Verify server."""
    other = tmp_path / "other-ca"
    sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", other)
    stranger = sign(other, "spiffe://example.org/ns/default/sa/client", name="stranger")
    x_leaf, x_chain = split_chain(stranger, tmp_path, "stranger")
    s_leaf, s_chain, s_key = mtls_pair["server"]
    server = OpenSSLServer(server_args(ca, s_leaf, s_chain, s_key))
    try:
        port = server.start()
        s_client(port, "-cert", x_leaf, "-key", stranger.key, "-cert_chain", x_chain,
                 "-CAfile", ca / "bundle.pem")
        srv = server.output()
        assert "certificate verify failed" in srv, srv
        assert "0 server accepts that finished" in srv, srv
        assert "Client certificate" not in srv, srv
    finally:
        server.stop()


def test_mtls_server_rejects_client_without_certificate(ca, mtls_pair):
    s_leaf, s_chain, s_key = mtls_pair["server"]
    server = OpenSSLServer(server_args(ca, s_leaf, s_chain, s_key))
    try:
        port = server.start()
        s_client(port, "-CAfile", ca / "bundle.pem")
        srv = server.output()
        assert "0 server accepts that finished" in srv, srv
        assert "Client certificate" not in srv, srv
    finally:
        server.stop()


def test_client_rejects_server_from_another_ca(sigil, ca, mtls_pair, tmp_path):
    """Control: s_client verifying against a different bundle must not report success."""
    other = tmp_path / "other-ca"
    sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", other)
    s_leaf, s_chain, s_key = mtls_pair["server"]
    c_leaf, c_chain, c_key = mtls_pair["client"]
    server = OpenSSLServer(server_args(ca, s_leaf, s_chain, s_key))
    try:
        port = server.start()
        out = s_client(port, "-cert", c_leaf, "-key", c_key, "-cert_chain", c_chain,
                       "-CAfile", other / "bundle.pem")
        assert "Verify return code: 0 (ok)" not in out, out
    finally:
        server.stop()


# --------------------------------------------------------------------------- upstream (corporate) CA


def test_upstream_single_level_corporate_root(sigil, sign, tmp_path):
    root, root_key = make_ca_cert(tmp_path, "corp-root", "/O=Corp/CN=Corp Root")
    data = tmp_path / "ca"
    sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", data,
             "--upstream-cert", root, "--upstream-key", root_key)
    # the trust bundle is exactly the corporate root
    bundle = load_pem_certs((data / "bundle.pem").read_text())
    assert [cert_der(c) for c in bundle] == [cert_der(c) for c in load_pem_certs(root.read_text())]
    # the corporate key is not copied into Sigil's key directory
    root_key_text = root_key.read_text()
    for f in (data / "keys").glob("*.key.pem"):
        assert f.read_text() != root_key_text

    issued = sign(data)
    assert len(issued.chain) == 2
    corp = bundle[0]
    assert issued.intermediate.issuer == corp.subject
    for purpose in ("sslclient", "sslserver"):
        verify(root, issued.chain_path, purpose)
    # and the SPIFFE bundle carries the corporate root
    spiffe = sigil.ok("bundle", "show", "--data-dir", data, "--format", "spiffe").stdout
    doc = json.loads(spiffe)
    assert [base64.b64decode(k["x5c"][0]) for k in doc["keys"]] == [cert_der(corp)]


def test_upstream_two_level_with_bundle(sigil, sign, tmp_path):
    root, root_key = make_ca_cert(tmp_path, "corp-root", "/O=Corp/CN=Corp Root")
    corp_int, corp_int_key = make_ca_cert(tmp_path, "corp-int", "/O=Corp/CN=Corp Issuing",
                                          issuer=(root, root_key), days=365)
    data = tmp_path / "ca"
    sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", data,
             "--upstream-cert", corp_int, "--upstream-key", corp_int_key, "--upstream-bundle", root)
    bundle = load_pem_certs((data / "bundle.pem").read_text())
    assert [cert_der(c) for c in bundle] == [cert_der(c) for c in load_pem_certs(root.read_text())]

    issued = sign(data)
    corp_int_cert = load_pem_certs(corp_int.read_text())[0]
    assert len(issued.chain) == 3, issued.chain_pem
    leaf, sigil_int, third = issued.chain
    assert cert_der(third) == cert_der(corp_int_cert)
    assert leaf.issuer == sigil_int.subject
    assert sigil_int.issuer == corp_int_cert.subject
    assert sigil_int.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for purpose in ("sslclient", "sslserver"):
        verify(root, issued.chain_path, purpose)
    # the corporate intermediate alone is not a trust anchor for the leaf chain without the root
    res = openssl("verify", "-x509_strict", "-CAfile", corp_int, "-untrusted", issued.chain_path,
                  issued.chain_path, check=False)
    assert res.returncode != 0, res.describe()


@pytest.mark.parametrize("case", ["root-pathlen-1", "name-constraints"])
def test_an_upstream_under_which_no_svid_could_validate_is_refused(sigil, tmp_path, case):
    """RFC 5280 path validation of an SVID under the new intermediate runs at init: a root with
    pathlen:1 above a corporate intermediate leaves no room for Sigil's intermediate, and a root
    that permits only other URI names excludes every SPIFFE ID. Both used to be accepted, and then
    no SVID ever verified (openssl: path length exceeded / permitted subtree violation)."""
    if case == "root-pathlen-1":
        root, root_key = make_ca_cert(tmp_path, "corp-root", "/O=Corp/CN=Corp Root", basic="critical,CA:TRUE,pathlen:1")
        upstream, upstream_key = make_ca_cert(tmp_path, "corp-int", "/O=Corp/CN=Corp Issuing", issuer=(root, root_key), days=365)
        extra = ["--upstream-bundle", root]
    else:
        upstream, upstream_key = make_ca_cert(tmp_path, "corp-root", "/O=Corp/CN=Corp Root",
                                              extensions=["nameConstraints=critical,permitted;URI:.other.org"])
        extra = []
    data = tmp_path / "ca"
    res = sigil("ca", "init", "--trust-domain", "example.org", "--data-dir", data,
                "--upstream-cert", upstream, "--upstream-key", upstream_key, *extra)
    assert res.returncode == 2, res.describe()
    assert "would not validate" in res.stderr, res.describe()
    assert not (data / "sigil.db").exists() and not (data / "bundle.pem").exists(), tree_listing(data)
    # With --force over a working CA, the refusal leaves that CA in place (nothing moved aside).
    sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", data)
    before = (data / "bundle.pem").read_bytes()
    res = sigil("ca", "init", "--trust-domain", "example.org", "--data-dir", data, "--force",
                "--upstream-cert", upstream, "--upstream-key", upstream_key, *extra)
    assert res.returncode == 2, res.describe()
    assert (data / "bundle.pem").read_bytes() == before and not list(data.glob("replaced-*")), tree_listing(data)


def test_upstream_two_level_without_bundle_is_refused(sigil, tmp_path):
    root, root_key = make_ca_cert(tmp_path, "corp-root", "/O=Corp/CN=Corp Root")
    corp_int, corp_int_key = make_ca_cert(tmp_path, "corp-int", "/O=Corp/CN=Corp Issuing",
                                          issuer=(root, root_key), days=365)
    data = tmp_path / "ca"
    res = sigil("ca", "init", "--trust-domain", "example.org", "--data-dir", data,
                "--upstream-cert", corp_int, "--upstream-key", corp_int_key)
    assert res.returncode == 2, res.describe()
    assert "error:" in res.stderr.lower()
    assert "--upstream-bundle" in res.stderr, res.describe()
    assert not (data / "sigil.db").exists() and not (data / "bundle.pem").exists(), tree_listing(data)


def test_upstream_mismatched_key_is_refused(sigil, tmp_path):
    root, root_key = make_ca_cert(tmp_path, "corp-root", "/O=Corp/CN=Corp Root")
    _, other_key = make_ca_cert(tmp_path, "other-root", "/O=Other/CN=Other Root")
    data = tmp_path / "ca"
    res = sigil("ca", "init", "--trust-domain", "example.org", "--data-dir", data,
                "--upstream-cert", root, "--upstream-key", other_key)
    assert res.returncode == 2, res.describe()
    assert "--upstream-key" in res.stderr and "belong" in res.stderr, res.describe()
    assert not (data / "sigil.db").exists() and not (data / "bundle.pem").exists(), tree_listing(data)


def test_upstream_bundle_that_does_not_chain_is_refused(sigil, tmp_path):
    root, root_key = make_ca_cert(tmp_path, "corp-root", "/O=Corp/CN=Corp Root")
    corp_int, corp_int_key = make_ca_cert(tmp_path, "corp-int", "/O=Corp/CN=Corp Issuing",
                                          issuer=(root, root_key), days=365)
    unrelated, _ = make_ca_cert(tmp_path, "unrelated", "/O=Else/CN=Unrelated Root")
    data = tmp_path / "ca"
    res = sigil("ca", "init", "--trust-domain", "example.org", "--data-dir", data,
                "--upstream-cert", corp_int, "--upstream-key", corp_int_key, "--upstream-bundle", unrelated)
    assert res.returncode == 2, res.describe()
    assert "chain" in res.stderr, res.describe()
    assert not (data / "sigil.db").exists(), tree_listing(data)


@pytest.mark.parametrize("basic,key_usage,keyword", [
    ("critical,CA:TRUE,pathlen:0", "critical,keyCertSign,cRLSign", "pathLenConstraint"),
    ("critical,CA:FALSE", "critical,keyCertSign,cRLSign", "not a CA"),
    ("critical,CA:TRUE", "critical,digitalSignature", "keyCertSign"),
])
def test_upstream_that_cannot_sign_an_intermediate_is_refused(sigil, tmp_path, basic, key_usage, keyword):
    cert, key = make_ca_cert(tmp_path, "bad-up", "/O=Corp/CN=Bad Upstream", basic=basic, key_usage=key_usage)
    data = tmp_path / "ca"
    res = sigil("ca", "init", "--trust-domain", "example.org", "--data-dir", data,
                "--upstream-cert", cert, "--upstream-key", key)
    assert res.returncode == 2, res.describe()
    assert keyword in res.stderr, res.describe()
    assert not (data / "sigil.db").exists(), tree_listing(data)


def test_upstream_intermediate_lifetime_clamped_to_upstream(sigil, sign, tmp_path):
    root, root_key = make_ca_cert(tmp_path, "short-root", "/O=Corp/CN=Short Root", days=1)
    data = tmp_path / "ca"
    sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", data,
             "--upstream-cert", root, "--upstream-key", root_key, "--ca-ttl", "30d")
    corp = load_pem_certs(root.read_text())[0]
    issued = sign(data)
    assert issued.intermediate.not_valid_after_utc <= corp.not_valid_after_utc
    assert issued.leaf.not_valid_after_utc <= issued.intermediate.not_valid_after_utc
    verify(root, issued.chain_path, "sslclient")
