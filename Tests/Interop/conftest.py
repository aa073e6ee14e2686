"""Fixtures for the Sigil interop tests.

* `sigil_bin`  – path of the binary (env SIGIL_BIN, default /work/main/.build/debug/sigil)
* `sigil`      – a runner: sigil("ca", "status", ...) -> Result(returncode, stdout, stderr),
                 always with a timeout; it also asserts that no command ever prints private
                 key material on stdout or stderr.
* `ca`         – `sigil ca init --trust-domain example.org --data-dir <tmp_path>/ca`, yields the dir
* `sign`       – make an openssl CSR and sign it with `sigil ca sign`; returns an Issued record
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pytest
from cryptography import x509

sys.path.insert(0, str(Path(__file__).parent))

from interop_util import (  # noqa: E402
    DEFAULT_TIMEOUT,
    TRUST_DOMAIN,
    WORKLOAD_ID,
    Result,
    load_pem_certs,
    make_csr,
    run,
)

DEFAULT_SIGIL_BIN = "/work/main/.build/debug/sigil"
PRIVATE_KEY_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----|PRIVATE KEY-----")

@pytest.fixture(scope="session")
def sigil_bin() -> Path:
    path = Path(os.environ.get("SIGIL_BIN", DEFAULT_SIGIL_BIN))
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"sigil binary not found or not executable at {path} "
                    f"(build with `swift build` or set SIGIL_BIN)")
    return path


class SigilRunner:
    def __init__(self, binary: Path):
        self.binary = binary

    def __call__(self, *args: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT,
                 input: str | None = None, cwd: str | os.PathLike | None = None) -> Result:
        res = run([self.binary, *args], timeout=timeout, input=input, cwd=cwd)
        # Requirement 7: no command ever prints private key material (PEM armour of any private key).
        for stream, text in (("stdout", res.stdout), ("stderr", res.stderr)):
            assert not PRIVATE_KEY_PEM.search(text), f"private key material on {stream}!\n{res.describe()}"
        return res

    def ok(self, *args: str | os.PathLike, **kw) -> Result:
        res = self(*args, **kw)
        assert res.returncode == 0, res.describe()
        return res

    def init(self, data_dir: Path, *extra: str | os.PathLike, trust_domain: str = TRUST_DOMAIN,
             **kw) -> Result:
        return self("ca", "init", "--trust-domain", trust_domain, "--data-dir", data_dir, *extra, **kw)

    def sign(self, data_dir: Path, csr: Path, spiffe_id: str = WORKLOAD_ID, *extra: str | os.PathLike,
             **kw) -> Result:
        return self("ca", "sign", "--data-dir", data_dir, "--csr", csr, "--spiffe-id", spiffe_id,
                    *extra, **kw)


@pytest.fixture(scope="session")
def sigil(sigil_bin: Path) -> SigilRunner:
    return SigilRunner(sigil_bin)


@pytest.fixture
def ca(sigil: SigilRunner, tmp_path: Path) -> Path:
    data_dir = tmp_path / "ca"
    sigil.ok("ca", "init", "--trust-domain", TRUST_DOMAIN, "--data-dir", data_dir)
    assert (data_dir / "bundle.pem").is_file()
    assert (data_dir / "sigil.db").is_file()
    yield data_dir


@dataclass
class Issued:
    """One SVID issued by `sigil ca sign` for a fresh openssl key."""
    csr: Path
    key: Path
    chain_path: Path
    chain_pem: str
    chain: list[x509.Certificate]
    result: Result

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def intermediate(self) -> x509.Certificate:
        return self.chain[1]


@pytest.fixture
def sign(sigil: SigilRunner, tmp_path: Path) -> Callable[..., Issued]:
    counter = {"n": 0}

    def _sign(data_dir: Path, spiffe_id: str = WORKLOAD_ID, *, kind: str = "p256",
              extra: Sequence[str] = (), subject: str = "/CN=workload",
              addext: Sequence[str] = (), name: str | None = None) -> Issued:
        counter["n"] += 1
        name = name or f"svid{counter['n']}"
        csr, key = make_csr(tmp_path, name, kind, subject=subject, addext=addext)
        res = sigil.sign(data_dir, csr, spiffe_id, *extra)
        assert res.returncode == 0, res.describe()
        chain = load_pem_certs(res.stdout)
        assert len(chain) >= 2, f"expected leaf + intermediate on stdout\n{res.describe()}"
        chain_path = tmp_path / f"{name}.chain.pem"
        chain_path.write_text(res.stdout)
        return Issued(csr, key, chain_path, res.stdout, chain, res)

    return _sign
