"""The README's five-minute tour, run as written: every ```sh block of the section, in order, in
one bash shell (`set -e`), with `sigil` on PATH. Only the fixed ports and /tmp/sigil are swapped
for free ones and a temporary directory, so the run cannot collide with anything on the machine."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from interop_util import free_port

REPO = Path(__file__).resolve().parents[2]


def tour_script() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## A five-minute tour", 1)[1].split("\nRotation (", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) >= 4, "the tour's code blocks were not found"
    return "\n".join(blocks)


def test_the_readme_tour_runs_as_written(sigil_bin, tmp_path):
    script = tour_script()
    assert script.startswith("swift build && export PATH=")
    script = script.split("\n", 1)[1]  # the binary under test is already built and on PATH
    work = tmp_path / "tour"
    work.mkdir()
    shutil.copytree(REPO / "deploy", work / "deploy")
    state = tmp_path / "s"  # stands for /tmp/sigil (short: Unix socket paths have a length limit)
    script = script.replace("/tmp/sigil", str(state))
    for port in ["8081", "8080", "8090", "15001", "15006", "15007"]:
        script = re.sub(rf"(?<![0-9]){port}(?![0-9])", str(free_port()), script)
    env = {**os.environ, "PATH": f"{Path(sigil_bin).parent}:{os.environ['PATH']}"}
    env.pop("SIGIL_ADMIN_SOCKET", None)
    env.pop("SPIFFE_ENDPOINT_SOCKET", None)
    res = subprocess.run(["bash", "-ec", script + "\nwait\n"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300, start_new_session=True)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in state.glob("*.log")) if state.exists() else ""
    assert res.returncode == 0, f"rc={res.returncode}\nstdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}{logs}"
    out = res.stdout
    assert "OK" in out  # openssl verify
    assert '"caller":"spiffe://example.org/ns/shop/sa/web"' in out, out
    assert "RBAC: access denied" in out, out
    assert re.search(r"ledger intact: \d+ rows from \d+ writers", out), out
    assert "spiffe://example.org/ns/shop/sa/web -> spiffe://example.org/ns/shop/sa/api" in out, out
    assert (state / "svids" / "svid.0.pem").exists()
