"""Plain helpers shared by the interop tests (no pytest fixtures here; see conftest.py).

Everything that starts a process goes through `run()`, which always has a timeout and
captures stdout/stderr as text.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

DEFAULT_TIMEOUT = 60
TRUST_DOMAIN = "example.org"
WORKLOAD_ID = "spiffe://example.org/ns/default/sa/web"


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (f"$ {' '.join(self.args)}\nexit {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}")


def run(args: Sequence[str | os.PathLike], *, timeout: float = DEFAULT_TIMEOUT,
        input: str | bytes | None = None, cwd: str | os.PathLike | None = None) -> Result:
    argv = [str(a) for a in args]
    text_input = input if isinstance(input, str) or input is None else input.decode()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          input=text_input, cwd=cwd)
    return Result(argv, proc.returncode, proc.stdout, proc.stderr)


def openssl(*args: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
            input: str | None = None) -> Result:
    exe = shutil.which("openssl")
    assert exe, "openssl is required for the interop tests"
    res = run([exe, *args], timeout=timeout, input=input)
    if check:
        assert res.returncode == 0, res.describe()
    return res


# --------------------------------------------------------------------------- keys and CSRs

def newkey_args(kind: str) -> list[str]:
    return {
        "p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "p384": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
        "p521": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
        "rsa1024": ["-newkey", "rsa:1024"],
        "rsa2048": ["-newkey", "rsa:2048"],
        "rsa3072": ["-newkey", "rsa:3072"],
        "ed25519": ["-newkey", "ed25519"],
    }[kind]


def make_csr(directory: Path, name: str, kind: str = "p256", subject: str = "/CN=workload",
             addext: Sequence[str] = ()) -> tuple[Path, Path]:
    """`openssl req -new` a CSR with a fresh key; returns (csr_path, key_path)."""
    csr, key = directory / f"{name}.csr", directory / f"{name}.key"
    extra: list[str] = []
    for e in addext:
        extra += ["-addext", e]
    openssl("req", "-new", *newkey_args(kind), "-nodes", "-keyout", key, "-subj", subject,
            *extra, "-out", csr)
    return csr, key


def make_ca_cert(directory: Path, name: str, subject: str, *, issuer: tuple[Path, Path] | None = None,
                 basic: str = "critical,CA:TRUE", key_usage: str = "critical,keyCertSign,cRLSign",
                 days: int = 3650, extensions: Sequence[str] = ()) -> tuple[Path, Path]:
    """A corporate CA made by openssl: self-signed when issuer is None, else signed by issuer (cert, key).
    `extensions`: more extension lines (`nameConstraints=...`)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    if issuer is None:
        more = [arg for e in extensions for arg in ("-addext", e)]
        openssl("req", "-x509", "-new", *newkey_args("p256"), "-nodes", "-keyout", key, "-out", cert,
                "-subj", subject, "-days", str(days),
                "-addext", f"basicConstraints={basic}", "-addext", f"keyUsage={key_usage}",
                "-addext", "subjectKeyIdentifier=hash", *more)
    else:
        csr = directory / f"{name}.csr"
        openssl("req", "-new", *newkey_args("p256"), "-nodes", "-keyout", key, "-out", csr, "-subj", subject)
        ext = directory / f"{name}.ext"
        ext.write_text(f"basicConstraints={basic}\nkeyUsage={key_usage}\n"
                       "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + "".join(e + "\n" for e in extensions))
        openssl("x509", "-req", "-in", csr, "-CA", issuer[0], "-CAkey", issuer[1], "-set_serial",
                str(int.from_bytes(os.urandom(8), "big")), "-days", str(days), "-extfile", ext, "-out", cert)
    return cert, key


# --------------------------------------------------------------------------- certificates

def load_pem_certs(data: str | bytes) -> list[x509.Certificate]:
    if isinstance(data, str):
        data = data.encode()
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return []
    return x509.load_pem_x509_certificates(data)


def pem_block(label: str, der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the store

STORE_TABLES = ("authorities", "issued_certificates", "issuance_log")


def store_snapshot(data_dir: Path) -> dict[str, object]:
    """Row counts and a digest of every row of the CA's tables, read with Python's sqlite3.

    Opened read-only through a URI so that looking cannot change what we look at.
    """
    db = data_dir / "sigil.db"
    assert db.exists(), f"no store at {db}"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        snap: dict[str, object] = {}
        for table in STORE_TABLES:
            rows = conn.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
            snap[f"{table}.count"] = len(rows)
            snap[f"{table}.sha256"] = hashlib.sha256(repr(rows).encode()).hexdigest()
        return snap
    finally:
        conn.close()


def tree_listing(path: Path) -> list[str]:
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --------------------------------------------------------------------------- a full disk
# A small tmpfs, filled up: needs root and mount(2); the test is skipped otherwise.


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "256k"):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Writes zeros to <directory>/filler until the file system is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler
