"""Hostile and broken input: every refusal must exit 2, say why on stderr ("error: ..."), and leave
the CA's store exactly as it was (rows counted and hashed with Python's sqlite3)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from interop_util import (
    WORKLOAD_ID,
    cert_der,
    load_pem_certs,
    make_csr,
    openssl,
    pem_block,
    sha256_file,
    store_snapshot,
    tree_listing,
)


def assert_refused(res, *keywords: str, code: int = 2):
    assert res.returncode == code, res.describe()
    err = res.stderr.lower()
    assert "error:" in err, res.describe()
    for k in keywords:
        assert k.lower() in err, f"expected {k!r} in stderr\n{res.describe()}"
    assert "BEGIN CERTIFICATE" not in res.stdout, "a refused request must not print a certificate"
    # no stack traces / crash output
    assert "Fatal error" not in res.stderr and "Stack dump" not in res.stderr, res.describe()


@pytest.fixture
def good_csr(tmp_path):
    return make_csr(tmp_path, "good")[0]


@pytest.fixture
def refused_sign(sigil, ca):
    """Run `ca sign`, expect a refusal, and check the store did not change."""
    def _run(csr: Path, spiffe_id: str = WORKLOAD_ID, *keywords: str, extra=()):
        before = store_snapshot(ca)
        res = sigil.sign(ca, csr, spiffe_id, *extra)
        assert_refused(res, *keywords)
        after = store_snapshot(ca)
        assert after == before, f"store changed by a refused request\nbefore={before}\nafter={after}"
        return res
    return _run


def test_store_snapshot_detects_an_issuance(sigil, ca, good_csr):
    """Control: the store comparison used below does see a successful signing."""
    before = store_snapshot(ca)
    res = sigil.sign(ca, good_csr)
    assert res.returncode == 0, res.describe()
    after = store_snapshot(ca)
    assert after["issued_certificates.count"] == before["issued_certificates.count"] + 1
    assert after["issuance_log.count"] > before["issuance_log.count"]


# --------------------------------------------------------------------------- CSR bytes


def flip_signature_byte(csr_path: Path) -> bytes:
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    der = bytearray(csr.public_bytes(Encoding.DER))
    # the signature BIT STRING is the last element of the outer SEQUENCE: its last byte is
    # signature content (the low byte of ECDSA's s, or of the RSA signature value)
    der[-1] ^= 0x01
    bad = bytes(der)
    assert x509.load_der_x509_csr(bad).is_signature_valid is False  # still parses, no longer verifies
    return bad


@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_csr_with_bad_signature(refused_sign, tmp_path, kind, encoding):
    csr, _ = make_csr(tmp_path, f"tampered-{kind}", kind)
    bad = flip_signature_byte(csr)
    path = tmp_path / f"bad.{encoding}"
    path.write_bytes(pem_block("CERTIFICATE REQUEST", bad).encode() if encoding == "pem" else bad)
    refused_sign(path, WORKLOAD_ID, "signature")


def test_csr_with_swapped_public_key(refused_sign, tmp_path):
    """A CSR whose signature was made by a different key than the one it carries."""
    csr_a, _ = make_csr(tmp_path, "a")
    csr_b, _ = make_csr(tmp_path, "b")
    a = x509.load_pem_x509_csr(csr_a.read_bytes()).public_bytes(Encoding.DER)
    b = x509.load_pem_x509_csr(csr_b.read_bytes()).public_bytes(Encoding.DER)
    # both are P-256 CSRs with the same subject: the SubjectPublicKeyInfo has the same length and
    # position; splice b's key into a.
    spki_a = x509.load_pem_x509_csr(csr_a.read_bytes()).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    spki_b = x509.load_pem_x509_csr(csr_b.read_bytes()).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert len(spki_a) == len(spki_b) and spki_a in a
    spliced = a.replace(spki_a, spki_b)
    assert x509.load_der_x509_csr(spliced).is_signature_valid is False
    path = tmp_path / "spliced.csr"
    path.write_text(pem_block("CERTIFICATE REQUEST", spliced))
    refused_sign(path, WORKLOAD_ID, "signature")


def garbage_inputs(tmp_path: Path, ca: Path, sign_chain: str) -> dict[str, tuple[Path, str]]:
    files: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, keyword: str):
        p = tmp_path / name
        p.write_bytes(data)
        files[name] = (p, keyword)

    put("random-text.csr", b"this is not a certificate request at all\n", "csr")
    put("junk-base64.csr", b"-----BEGIN CERTIFICATE REQUEST-----\nQUJD!!!not*base64@@\n"
        b"-----END CERTIFICATE REQUEST-----\n", "csr")
    put("valid-base64-junk-der.csr", pem_block("CERTIFICATE REQUEST", os.urandom(200)).encode(), "csr")
    put("empty.csr", b"", "csr")
    put("random-bytes.der", os.urandom(512), "csr")
    put("truncated.csr", make_csr(tmp_path, "trunc")[0].read_bytes()[:300], "csr")
    root = load_pem_certs((ca / "bundle.pem").read_text())[0]
    put("certificate.pem", pem_block("CERTIFICATE", cert_der(root)).encode(), "CERTIFICATE")
    put("certificate.der", cert_der(root), "csr")
    put("chain.pem", sign_chain.encode(), "csr")
    return files


GARBAGE = ["random-text.csr", "junk-base64.csr", "valid-base64-junk-der.csr", "empty.csr",
           "random-bytes.der", "truncated.csr", "certificate.pem", "certificate.der", "chain.pem"]


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_csr_input(sigil, ca, refused_sign, good_csr, tmp_path, name):
    chain = sigil.sign(ca, good_csr).stdout
    path, keyword = garbage_inputs(tmp_path, ca, chain)[name]
    refused_sign(path, WORKLOAD_ID, keyword)


def test_missing_csr_file(refused_sign, tmp_path):
    refused_sign(tmp_path / "does-not-exist.csr", WORKLOAD_ID, "csr")


def test_csr_path_is_a_directory(refused_sign, tmp_path):
    d = tmp_path / "a-directory"
    d.mkdir()
    refused_sign(d, WORKLOAD_ID, "csr")


def test_huge_csr_file_is_refused_promptly(sigil, ca, tmp_path):
    big = tmp_path / "huge.csr"
    with big.open("wb") as f:
        f.write(b"-----BEGIN CERTIFICATE REQUEST-----\n")
        f.write(b"QUFB" * (4 * 1024 * 1024))  # 16 MiB of valid base64
        f.write(b"\n-----END CERTIFICATE REQUEST-----\n")
    before = store_snapshot(ca)
    res = sigil.sign(ca, big, WORKLOAD_ID, timeout=30)
    assert_refused(res, "csr")
    assert store_snapshot(ca) == before


def test_csr_on_stdin_garbage(sigil, ca):
    before = store_snapshot(ca)
    res = sigil("ca", "sign", "--data-dir", ca, "--csr", "-", "--spiffe-id", WORKLOAD_ID,
                input="not a csr\n")
    assert_refused(res, "csr")
    assert store_snapshot(ca) == before


# --------------------------------------------------------------------------- SPIFFE IDs and flags


@pytest.mark.parametrize("spiffe_id,keyword", [
    ("spiffe://EXAMPLE.org/x", "lowercase"),
    ("http://example.org/x", "spiffe://"),
    ("spiffe://example.org/a/../b", ".."),
    ("spiffe://example.org/a/./b", "."),
    ("spiffe://example.org/x/", "trailing"),
    ("spiffe://other.org/ns/a/sa/b", "trust domain"),
    ("spiffe://example.org", "path"),
    ("spiffe://example.org/", "/"),
    ("spiffe://example.org/a//b", "empty"),
    ("spiffe://example.org/a%2Fb", "%"),
    ("spiffe://example.org/x?y=1", "query"),
    ("spiffe://example.org/x#frag", "fragment"),
    ("spiffe://user@example.org/x", "userinfo"),
    ("spiffe://example.org:443/x", "port"),
    ("SPIFFE://example.org/x", "spiffe"),
    ("spiffe://example.org/ä", "spiffe"),
    ("spiffe://example.org/a b", "spiffe"),
    ("", "empty"),
])
def test_invalid_spiffe_id(refused_sign, good_csr, spiffe_id, keyword):
    refused_sign(good_csr, spiffe_id, keyword)


@pytest.mark.parametrize("dns,keyword", [
    ("a b.example.org", "dns"),
    ("a..example.org", "dns"),
    ("ex_ample.org", "dns"),
    ("x" * 64 + ".example.org", "dns"),
    ("", "dns"),
])
def test_invalid_dns_name(refused_sign, good_csr, dns, keyword):
    refused_sign(good_csr, WORKLOAD_ID, keyword, extra=[f"--dns={dns}"])


@pytest.mark.parametrize("ttl", ["0s", "1s", "0", "-1h", "1x", "99999999999d"])
def test_invalid_ttl(sigil, ca, good_csr, ttl):
    before = store_snapshot(ca)
    res = sigil.sign(ca, good_csr, WORKLOAD_ID, f"--ttl={ttl}")
    assert res.returncode == 2, res.describe()
    assert "error:" in res.stderr.lower() and ("ttl" in res.stderr.lower() or "duration" in res.stderr.lower())
    assert store_snapshot(ca) == before


# --------------------------------------------------------------------------- weak and unsupported keys


def test_rsa_1024_csr_is_refused_as_weak(refused_sign, tmp_path):
    csr, _ = make_csr(tmp_path, "weak", "rsa1024")
    res = refused_sign(csr, WORKLOAD_ID)
    err = res.stderr.lower()
    assert "weak" in err and "1024" in err, res.describe()


@pytest.mark.parametrize("kind", ["p521", "ed25519"])
def test_unsupported_key_types_are_refused(refused_sign, tmp_path, kind):
    csr, _ = make_csr(tmp_path, kind, kind)
    refused_sign(csr, WORKLOAD_ID, "not supported")


# --------------------------------------------------------------------------- ca init on bad directories


def test_init_data_dir_under_a_regular_file(sigil, tmp_path):
    parent = tmp_path / "plainfile"
    parent.write_text("I am a file\n")
    res = sigil.init(parent / "ca")
    assert res.returncode != 0, res.describe()
    assert_refused(res, "--data-dir", code=res.returncode)
    assert parent.read_text() == "I am a file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plainfile"]


def test_init_data_dir_is_a_regular_file(sigil, tmp_path):
    target = tmp_path / "plainfile"
    target.write_text("x")
    res = sigil.init(target)
    assert_refused(res, "not a directory", code=res.returncode)
    assert res.returncode != 0
    assert target.read_text() == "x"


def test_init_data_dir_under_proc(sigil):
    target = Path(f"/proc/sigil-interop-{os.getpid()}/ca")
    res = sigil.init(target)
    assert res.returncode != 0, res.describe()
    assert_refused(res, "cannot create", code=res.returncode)
    assert not target.parent.exists()


def test_init_bad_trust_domain_creates_nothing(sigil, tmp_path):
    # (a spiffe://example.org form is accepted and normalised, as go-spiffe's TrustDomainFromString does)
    for td in ["Example.org", "example.org/x", "", "exa mple.org", "example.org:8443", "http://example.org"]:
        target = tmp_path / "ca"
        res = sigil.init(target, trust_domain=td)
        assert_refused(res, "trust domain" if td else "")
        assert not target.exists(), (td, tree_listing(target))


# --------------------------------------------------------------------------- ca init twice / --force


def test_init_twice_refuses_then_force_replaces(sigil, ca, sign):
    bundle = ca / "bundle.pem"
    old_bundle = bundle.read_bytes()
    old_fp = sha256_file(bundle)
    old_keys = sorted(p.name for p in (ca / "keys").iterdir())
    issued = sign(ca)  # something in the store worth keeping
    old_store = store_snapshot(ca)

    res = sigil.init(ca)
    assert_refused(res, "already", "--force")
    assert sha256_file(bundle) == old_fp, "the existing CA was overwritten"
    assert sorted(p.name for p in (ca / "keys").iterdir()) == old_keys
    assert store_snapshot(ca) == old_store
    assert not list(ca.glob("replaced-*"))

    # even with another trust domain, no --force means no change
    res = sigil.init(ca, trust_domain="other.org")
    assert_refused(res, "already")
    assert sha256_file(bundle) == old_fp

    res = sigil.init(ca, "--force")
    assert res.returncode == 0, res.describe()
    assert sha256_file(bundle) != old_fp, "--force did not make a new CA"
    replaced = sorted(ca.glob("replaced-*"))
    assert len(replaced) == 1, tree_listing(ca)
    moved = replaced[0]
    assert (moved / "bundle.pem").read_bytes() == old_bundle
    assert sorted(p.name for p in (moved / "keys").iterdir()) == old_keys
    assert store_snapshot(moved)["issued_certificates.count"] == old_store["issued_certificates.count"]
    # the new CA starts with a clean store and the old chain no longer verifies against it
    assert store_snapshot(ca)["issued_certificates.count"] == 0
    res = openssl("verify", "-CAfile", bundle, "-untrusted", issued.chain_path, issued.chain_path, check=False)
    assert res.returncode != 0

    # Two more --force in quick succession (the same second, as a script would): each CA put aside
    # keeps a directory of its own. The second used to overwrite the first's database and fail
    # half-way, leaving no CA in place.
    second_keys = sorted(p.name for p in (ca / "keys").iterdir())
    for _ in range(2):
        res = sigil.init(ca, "--force")
        assert res.returncode == 0, res.describe()
    replaced = sorted(ca.glob("replaced-*"))
    assert len(replaced) == 3, tree_listing(ca)
    assert all((d / "sigil.db").exists() and (d / "keys").is_dir() for d in replaced), tree_listing(ca)
    assert any(sorted(p.name for p in (d / "keys").iterdir()) == second_keys for d in replaced)


def test_a_force_init_that_fails_puts_the_previous_ca_back(sigil, sigil_bin, tmp_path):
    """--force moves the CA aside before writing the new one; a failure while writing (here the
    bundle's temporary file name is taken) used to leave the data directory with no CA at all."""
    import subprocess
    ca = tmp_path / "ca"
    assert sigil.init(ca).returncode == 0
    before = sha256_file(ca / "bundle.pem")
    proc = subprocess.Popen([sigil_bin, "ca", "init", "--force", "--trust-domain", "other.org", "--data-dir", ca],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (ca / f"bundle.pem.tmp-{proc.pid}").mkdir()  # long before the process gets to write the bundle
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "previous CA is back in place" in err, err
    assert sha256_file(ca / "bundle.pem") == before and not list(ca.glob("replaced-*")), tree_listing(ca)
    status = sigil("ca", "status", "--data-dir", ca)
    assert status.returncode == 0 and "trust domain example.org" in status.stdout, status.describe()


def test_ca_init_refuses_a_trust_domain_with_a_path_and_an_intermediate_outliving_its_root(sigil, tmp_path):
    res = sigil.init(tmp_path / "a", trust_domain="spiffe://example.org/foo")
    assert_refused(res, "has a path")
    res = sigil.init(tmp_path / "b", "--ca-ttl", "2h", "--root-ttl", "1h")
    assert_refused(res, "--ca-ttl")
    assert not (tmp_path / "a" / "sigil.db").exists() and not (tmp_path / "b" / "sigil.db").exists()


def test_sign_without_ca(sigil, tmp_path, good_csr):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = sigil.sign(empty, good_csr)
    assert_refused(res, "sigil ca init")
    assert list(empty.iterdir()) == [], "a failed sign must not create a store"
    missing = tmp_path / "missing"
    res = sigil.sign(missing, good_csr)
    assert_refused(res, "sigil ca init")
    assert not missing.exists()


def test_status_and_bundle_without_ca(sigil, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["ca", "status", "--data-dir", empty], ["bundle", "show", "--data-dir", empty]):
        res = sigil(*args)
        assert_refused(res, "sigil ca init")
        assert list(empty.iterdir()) == []


def test_corrupt_store_is_refused(sigil, ca, good_csr):
    db = ca / "sigil.db"
    db.write_bytes(b"this is not sqlite" * 100)
    res = sigil.sign(ca, good_csr)
    assert res.returncode != 0, res.describe()
    assert "error:" in res.stderr.lower(), res.describe()
    assert "BEGIN CERTIFICATE" not in res.stdout


def test_missing_signing_key_is_refused(sigil, ca, good_csr):
    before = store_snapshot(ca)
    for key in (ca / "keys").glob("*.key.pem"):
        key.unlink()
    res = sigil.sign(ca, good_csr)
    assert res.returncode != 0, res.describe()
    assert "error:" in res.stderr.lower() and "key" in res.stderr.lower(), res.describe()
    assert "BEGIN CERTIFICATE" not in res.stdout
    assert store_snapshot(ca) == before


# --------------------------------------------------------------------------- concurrency


def test_concurrent_signing_is_serialised(sigil_bin, ca, tmp_path):
    n = 10
    csrs = [make_csr(tmp_path, f"c{i}")[0] for i in range(n)]
    procs = [subprocess.Popen([str(sigil_bin), "ca", "sign", "--data-dir", str(ca), "--csr", str(c),
                               "--spiffe-id", f"spiffe://example.org/ns/load/sa/w{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, c in enumerate(csrs)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert all(rc == 0 for rc, _, _ in outs), [e for rc, _, e in outs if rc]
    serials = {load_pem_certs(o)[0].serial_number for _, o, _ in outs}
    assert len(serials) == n
    assert store_snapshot(ca)["issued_certificates.count"] == n


def test_concurrent_init_leaves_exactly_one_working_ca(sigil_bin, sigil, tmp_path):
    problems = []
    for round_no in range(8):
        data = tmp_path / f"race{round_no}"
        argv = [str(sigil_bin), "ca", "init", "--trust-domain", "example.org", "--data-dir", str(data)]
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = []
        try:
            for p in procs:
                out, err = p.communicate(timeout=60)
                results.append((p.returncode, err.strip()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
        winners = [r for r in results if r[0] == 0]
        status = sigil("ca", "status", "--data-dir", data, "--json")
        keys = sorted((data / "keys").glob("*.key.pem")) if (data / "keys").exists() else []
        if len(winners) != 1 or status.returncode != 0 or len(keys) != 2:
            problems.append(f"round {round_no}: exits={[r[0] for r in results]} "
                            f"status_rc={status.returncode} keys={len(keys)} "
                            f"db={'yes' if (data / 'sigil.db').exists() else 'MISSING'} "
                            f"errors={[r[1] for r in results if r[0]]}")
            continue
        # the bundle on disk is the root the store holds
        roots = [a for a in json.loads(status.stdout)["authorities"] if a["kind"] == "root"]
        bundle_root = load_pem_certs((data / "bundle.pem").read_text())[0]
        if [r["fingerprint"] for r in roots] != [bundle_root.fingerprint(hashes.SHA256()).hex()]:
            problems.append(f"round {round_no}: bundle.pem root is not the store's root")
    assert not problems, "\n".join(problems)
