"""X509-SVID / SPIFFE-ID spec MUSTs, the SPIFFE bundle format, CSR smuggling and key-file hygiene,
checked with Python `cryptography` on what the real `sigil` binary produces."""
from __future__ import annotations

import base64
import datetime as dt
import json
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from interop_util import WORKLOAD_ID, cert_der, load_pem_certs, openssl, run

UTC = dt.timezone.utc


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


def uris(cert: x509.Certificate) -> list[str]:
    return ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)


def dns_names(cert: x509.Certificate) -> list[str]:
    return ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def root_of(ca: Path) -> x509.Certificate:
    roots = load_pem_certs((ca / "bundle.pem").read_text())
    assert len(roots) == 1, "a fresh self-signed CA has exactly one root in its bundle"
    return roots[0]


def b64url_decode(s: str) -> bytes:
    assert "=" not in s, f"base64url value must not be padded: {s!r}"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", s), f"not base64url: {s!r}"
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def parse_status(text: str) -> dict:
    return json.loads(text)


# =========================================================================== the leaf


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048"])
def test_leaf_identity_and_constraints(ca, sign, kind):
    issued = sign(ca, WORKLOAD_ID, kind=kind)
    leaf = issued.leaf

    # exactly one URI SAN, the requested SPIFFE ID; no DNS SAN when none was asked for
    assert uris(leaf) == [WORKLOAD_ID]
    assert dns_names(leaf) == []
    san_ext = ext(leaf, x509.SubjectAlternativeName)
    if len(leaf.subject) == 0:
        assert san_ext.critical, "RFC 5280: SAN must be critical when the subject is empty"

    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False

    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature is True
    assert ku.value.key_cert_sign is False
    assert ku.value.crl_sign is False
    if kind.startswith("rsa"):
        assert ku.value.key_encipherment is True, "RSA SVIDs need keyEncipherment (TLS RSA key transport)"
    else:
        assert ku.value.key_encipherment is False, "EC keys cannot encipher keys"

    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku

    # the public key is the CSR's
    csr = x509.load_pem_x509_csr(issued.csr.read_bytes())
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert leaf.public_key().public_bytes(serialization.Encoding.DER, pub) == \
        csr.public_key().public_bytes(serialization.Encoding.DER, pub)


def test_leaf_dns_sans_when_requested(ca, sign):
    issued = sign(ca, WORKLOAD_ID, extra=["--dns", "web.example.org", "--dns", "web.default.svc"])
    assert sorted(dns_names(issued.leaf)) == ["web.default.svc", "web.example.org"]
    assert uris(issued.leaf) == [WORKLOAD_ID]


def test_serials_are_positive_128_bit_and_unique(ca, sign):
    serials = [sign(ca, WORKLOAD_ID).leaf.serial_number for _ in range(4)]
    for s in serials:
        assert s > 0
        assert s.bit_length() == 128, hex(s)
    assert len(set(serials)) == len(serials), "two SVIDs share a serial"


def test_validity_matches_ttl(ca, sign):
    before = now().replace(microsecond=0)
    issued = sign(ca, WORKLOAD_ID, extra=["--ttl", "2h"])
    after = now()
    leaf = issued.leaf
    nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    assert nb <= now() <= na
    # notBefore is backdated by about 30 s for clock skew (never more than a couple of minutes)
    assert before - dt.timedelta(seconds=120) <= nb <= after
    # notAfter is issuance time + TTL (X.509 times have whole seconds; allow rounding either way)
    one = dt.timedelta(seconds=1)
    assert before + dt.timedelta(hours=2) - one <= na <= after + dt.timedelta(hours=2) + one, (before, after, na)
    lifetime = (na - nb).total_seconds()
    assert 2 * 3600 <= lifetime <= 2 * 3600 + 60, lifetime


def test_default_ttl_is_one_hour(ca, sign):
    leaf = sign(ca, WORKLOAD_ID).leaf
    remaining = (leaf.not_valid_after_utc - now()).total_seconds()
    assert 3600 - 60 <= remaining <= 3600 + 1, remaining


def test_leaf_not_after_clamped_to_intermediate(sigil, sign, tmp_path):
    data = tmp_path / "short-ca"
    sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", data, "--ca-ttl", "2h")
    issued = sign(data, WORKLOAD_ID, extra=["--ttl", "5h"])
    inter = issued.intermediate
    inter_life = (inter.not_valid_after_utc - now()).total_seconds()
    assert 2 * 3600 - 120 <= inter_life <= 2 * 3600 + 1, inter_life
    assert issued.leaf.not_valid_after_utc == inter.not_valid_after_utc


def test_leaf_signed_by_intermediate_and_linked_by_key_ids(ca, sign):
    issued = sign(ca, WORKLOAD_ID)
    leaf, inter = issued.leaf, issued.intermediate
    leaf.verify_directly_issued_by(inter)  # raises on a bad signature / name mismatch
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier
    ski = ext(inter, x509.SubjectKeyIdentifier).value.digest
    assert aki is not None and aki == ski
    # and the intermediate is signed by the root
    root = root_of(ca)
    inter.verify_directly_issued_by(root)
    assert ext(inter, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(root, x509.SubjectKeyIdentifier).value.digest
    # a leaf must not verify as issued by the root directly
    with pytest.raises(Exception):
        leaf.verify_directly_issued_by(root)


# =========================================================================== the CA certificates


def check_ca_cert(cert: x509.Certificate):
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign is True and ku.value.crl_sign is True
    assert uris(cert) == ["spiffe://example.org"], uris(cert)
    # SPIFFE: a signing certificate SHOULD NOT carry EKU-restricted leaf usages such as these
    assert ku.value.key_encipherment is False


def test_root_and_intermediate_ca_profiles(ca, sign):
    root = root_of(ca)
    issued = sign(ca, WORKLOAD_ID)
    inter = issued.intermediate
    check_ca_cert(root)
    check_ca_cert(inter)
    assert ext(inter, x509.BasicConstraints).value.path_length == 0
    root.verify_directly_issued_by(root)  # self-signed
    assert inter.not_valid_after_utc <= root.not_valid_after_utc
    assert root.serial_number > 0 and inter.serial_number > 0


def test_ca_ttl_sets_intermediate_lifetime(sigil, sign, tmp_path):
    data = tmp_path / "ca3h"
    sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", data, "--ca-ttl", "3h",
             "--root-ttl", "10d")
    inter = sign(data, WORKLOAD_ID).intermediate
    root = root_of(data)
    assert abs((inter.not_valid_after_utc - now()).total_seconds() - 3 * 3600) < 120
    assert abs((root.not_valid_after_utc - now()).total_seconds() - 10 * 86400) < 120


# =========================================================================== bundle formats


def test_bundle_show_pem_equals_bundle_file(sigil, ca):
    out = sigil.ok("bundle", "show", "--data-dir", ca, "--format", "pem").stdout
    assert [cert_der(c) for c in load_pem_certs(out)] == [root_of(ca).public_bytes(serialization.Encoding.DER)]


def test_spiffe_bundle_json(sigil, ca):
    out = sigil.ok("bundle", "show", "--data-dir", ca, "--format", "spiffe").stdout
    doc = json.loads(out)
    assert isinstance(doc.get("keys"), list) and len(doc["keys"]) == 1
    assert type(doc.get("spiffe_sequence")) is int and doc["spiffe_sequence"] >= 1
    assert type(doc.get("spiffe_refresh_hint")) is int and doc["spiffe_refresh_hint"] > 0
    root = root_of(ca)
    for key in doc["keys"]:
        assert key["use"] == "x509-svid"
        assert "kid" not in key, "SPIFFE x509-svid JWKs must not carry kid"
        assert isinstance(key["x5c"], list) and len(key["x5c"]) == 1
        der = base64.b64decode(key["x5c"][0], validate=True)  # standard base64, not base64url
        assert der == cert_der(root)
        cert = x509.load_der_x509_certificate(der)
        pub = cert.public_key()
        assert key["kty"] == "EC"
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        curve = {"secp256r1": "P-256", "secp384r1": "P-384"}[pub.curve.name]
        assert key["crv"] == curve
        size = (pub.curve.key_size + 7) // 8
        nums = pub.public_numbers()
        x, y = b64url_decode(key["x"]), b64url_decode(key["y"])
        assert len(x) == size and len(y) == size, "coordinates must be full-length octet strings"
        assert int.from_bytes(x, "big") == nums.x
        assert int.from_bytes(y, "big") == nums.y


def test_status_json_counts_issued(sigil, ca, sign):
    before = parse_status(sigil.ok("ca", "status", "--data-dir", ca, "--json").stdout)
    kinds = sorted(a["kind"] for a in before["authorities"])
    assert kinds == ["intermediate", "root"]
    assert all(a["state"] == "active" for a in before["authorities"])
    sign(ca, WORKLOAD_ID)
    sign(ca, WORKLOAD_ID)
    after = parse_status(sigil.ok("ca", "status", "--data-dir", ca, "--json").stdout)
    issued = {a["kind"]: a["issued"] for a in after["authorities"]}
    assert issued["intermediate"] == 2 + {a["kind"]: a["issued"] for a in before["authorities"]}["intermediate"]


# =========================================================================== CSR smuggling


def test_csr_requested_extensions_are_ignored(ca, sign):
    issued = sign(
        ca, WORKLOAD_ID, extra=["--dns", "good.example.org"],
        subject="/CN=evil.com/O=Evil Corp",
        addext=[
            "basicConstraints=critical,CA:TRUE",
            "subjectAltName=URI:spiffe://evil.org/x,DNS:evil.com,email:root@evil.com,IP:10.0.0.1",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "extendedKeyUsage=codeSigning,serverAuth",
        ])
    csr = x509.load_pem_x509_csr(issued.csr.read_bytes())
    assert ext(csr, x509.BasicConstraints).value.ca is True  # the request really asked for it

    leaf = issued.leaf
    assert ext(leaf, x509.BasicConstraints).value.ca is False
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert sorted(
        (type(g).__name__, str(g.value)) for g in san) == sorted(
        [("UniformResourceIdentifier", WORKLOAD_ID), ("DNSName", "good.example.org")])
    ku = ext(leaf, x509.KeyUsage).value
    assert ku.key_cert_sign is False and ku.crl_sign is False
    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CODE_SIGNING not in eku
    assert "evil" not in leaf.subject.rfc4514_string().lower()
    # and the result still chains and is still a leaf to openssl
    res = openssl("verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", ca / "bundle.pem",
                  "-untrusted", issued.chain_path, issued.chain_path)
    assert "OK" in res.stdout


# =========================================================================== key files


def assert_key_files_private(data: Path, expected_keys: int | None = None):
    keys = data / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700, oct(keys.stat().st_mode)
    files = sorted(keys.glob("*.key.pem"))
    assert files, "no key files"
    if expected_keys is not None:
        assert len(files) == expected_keys, files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
        text = f.read_text()
        assert text.startswith("-----BEGIN PRIVATE KEY-----"), f"{f} is not PKCS#8 PEM"
        assert "EC PRIVATE KEY" not in text and "RSA PRIVATE KEY" not in text
        serialization.load_pem_private_key(text.encode(), password=None)
    # nothing else readable by group/other in keys/
    for f in keys.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f
    db = data / "sigil.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600, oct(db.stat().st_mode)
    return files


def test_key_files_permissions_and_pkcs8(ca, sign):
    files = assert_key_files_private(ca, expected_keys=2)
    # the two keys are the root's and the intermediate's
    issued = sign(ca, WORKLOAD_ID)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pubs = {serialization.load_pem_private_key(f.read_bytes(), None).public_key()
            .public_bytes(serialization.Encoding.DER, spki) for f in files}
    for cert in (root_of(ca), issued.intermediate):
        assert cert.public_key().public_bytes(serialization.Encoding.DER, spki) in pubs
    assert_key_files_private(ca, expected_keys=2)  # signing did not loosen anything


def test_key_files_private_even_with_permissive_umask(sigil_bin, tmp_path):
    data = tmp_path / "umask-ca"
    res = run(["sh", "-c", 'umask 000 && exec "$0" "$@"', sigil_bin, "ca", "init",
               "--trust-domain", "example.org", "--data-dir", data])
    assert res.returncode == 0, res.describe()
    assert "PRIVATE KEY" not in res.output
    assert stat.S_IMODE(data.stat().st_mode) & 0o077 == 0, oct(data.stat().st_mode)
    assert_key_files_private(data, expected_keys=2)


def test_no_private_key_material_in_any_output(sigil, sign, tmp_path):
    """The `sigil` runner already asserts this on every call; this test drives every command once."""
    data = tmp_path / "ca"
    outputs = []
    outputs.append(sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", data, "--json"))
    outputs.append(sigil.ok("ca", "init", "--trust-domain", "example.org", "--data-dir", data, "--force"))
    outputs.append(sign(data, WORKLOAD_ID).result)
    outputs.append(sigil.ok("ca", "status", "--data-dir", data))
    outputs.append(sigil.ok("ca", "status", "--data-dir", data, "--json"))
    outputs.append(sigil.ok("bundle", "show", "--data-dir", data))
    outputs.append(sigil.ok("bundle", "show", "--data-dir", data, "--format", "spiffe"))
    outputs.append(sigil("ca", "sign", "--data-dir", data, "--csr", data / "keys" / "nope.key.pem",
                         "--spiffe-id", WORKLOAD_ID))
    key_file = sorted((data / "keys").glob("*.key.pem"))[0]
    key_body = "".join(key_file.read_text().splitlines()[1:-1])
    for res in outputs:
        assert "PRIVATE KEY" not in res.output, res.describe()
        assert key_body[:40] not in res.output.replace("\n", ""), res.describe()
    # feed a private key where a CSR belongs: refused, and the error may name the PEM label
    # ('PRIVATE KEY') but must not echo the key itself back
    wrong = sigil("ca", "sign", "--data-dir", data, "--csr", key_file, "--spiffe-id", WORKLOAD_ID)
    assert wrong.returncode == 2, wrong.describe()
    assert "-----BEGIN" not in wrong.output, wrong.describe()
    assert key_body[:40] not in wrong.output.replace("\n", ""), wrong.describe()
    assert key_body[-40:] not in wrong.output.replace("\n", ""), wrong.describe()
    # the replaced CA's keys stay private too
    replaced = sorted(data.glob("replaced-*"))
    assert len(replaced) == 1
    assert_key_files_private(replaced[0], expected_keys=2)
