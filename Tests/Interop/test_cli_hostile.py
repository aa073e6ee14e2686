"""Hostile or mistaken input to the long-running commands (server, agent, proxy) and to the admin
API, found by an adversarial review: each one crashed, hung, deleted data or silently did the
wrong thing before. Every command here must answer with a clear message and the conventional
exit code (2: usage or input error), never a signal, never a default silently used."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from cluster import TRUST_DOMAIN, Cluster, Proc, served_cluster, wait_for
from interop_util import free_port, run

AGENT = f"spiffe://{TRUST_DOMAIN}/sigil/agent/node-1"
WORKLOAD = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web"


@pytest.fixture(scope="module")
def cluster(sigil_bin):
    with served_cluster(sigil_bin) as c:
        yield c


def test_agent_server_address_may_be_a_name_or_ipv6_and_a_bad_one_is_a_usage_error(sigil_bin, tmp_path):
    """`--server localhost:PORT` and `[::1]:PORT` used to crash the agent (Swift trap, exit 132)."""
    ca = tmp_path / "ca"
    assert run([sigil_bin, "ca", "init", "--trust-domain", TRUST_DOMAIN, "--data-dir", ca]).returncode == 0
    port = free_port()  # nothing listens: the agent must fail to attest, with the reason, not crash
    for name, server in (("name", f"localhost:{port}"), ("v6", f"[::1]:{port}")):
        res = run([sigil_bin, "agent", "run", "--server", server, "--join-token", "x" * 64, "--trust-bundle", ca / "bundle.pem",
                   "--socket", tmp_path / f"{name}.sock", "--data-dir", tmp_path / name], timeout=60)
        assert res.returncode == 1 and "cannot attest with the server" in res.stderr, res.describe()
    for server, words in (("bad host!:8081", "neither an IP address nor a DNS name"), ("127.0.0.1:0", "port 0")):
        res = run([sigil_bin, "agent", "run", "--server", server, "--join-token", "t", "--trust-bundle", ca / "bundle.pem",
                   "--socket", tmp_path / "b.sock", "--data-dir", tmp_path / "b"], timeout=30)
        assert res.returncode == 2 and words in res.stderr, res.describe()


def assert_agent_attests(cluster: Cluster, token: str, server: str, directory: Path):
    """Runs `sigil agent run` with `token` against `server` until it has attested (its agent SVID
    is cached), then stops it."""
    data = directory / "agent"
    agent = Proc([cluster.bin, "agent", "run", "--server", server, "--join-token", token,
                  "--trust-bundle", cluster.ca_dir / "bundle.pem", "--socket", directory / "agent.sock", "--data-dir", data],
                 directory / "agent.log")
    try:
        wait_for(lambda: (data / "agent.json").exists() or not agent.alive(), 30, f"the agent to attest with {server}")
        assert (data / "agent.json").exists() and agent.alive(), agent.output()
    finally:
        agent.stop()


def test_an_agent_given_another_cas_bundle_says_so(cluster, sigil_bin, tmp_path):
    """A --trust-bundle of another CA: the agent refuses the server's certificate and says that,
    not that the server closed the connection; the token is not used up."""
    other = tmp_path / "other"
    assert run([sigil_bin, "ca", "init", "--trust-domain", TRUST_DOMAIN, "--data-dir", other]).returncode == 0
    token = cluster.token("node-bundle")
    res = run([sigil_bin, "agent", "run", "--server", f"127.0.0.1:{cluster.port}", "--join-token", token,
               "--trust-bundle", other / "bundle.pem", "--socket", tmp_path / "a.sock", "--data-dir", tmp_path / "a"], timeout=60)
    assert res.returncode == 2 and "does not verify against --trust-bundle" in res.stderr, res.describe()
    assert_agent_attests(cluster, token, f"127.0.0.1:{cluster.port}", tmp_path)


def test_agent_attests_with_a_named_server(cluster, tmp_path):
    """With a real server, `--server localhost:PORT` attests: the name is resolved."""
    assert_agent_attests(cluster, cluster.token("node-1"), f"localhost:{cluster.port}", tmp_path)


def test_a_bad_agent_socket_is_refused_before_the_join_token_is_spent(cluster, tmp_path):
    """The agent used to attest first (spending its single-use token) and only then find that it
    could not serve its --socket."""
    token = cluster.token("node-2")
    blocker = tmp_path / "not-a-socket"
    blocker.write_text("x")
    res = run([cluster.bin, "agent", "run", "--server", f"127.0.0.1:{cluster.port}", "--join-token", token,
               "--trust-bundle", cluster.ca_dir / "bundle.pem", "--socket", blocker, "--data-dir", tmp_path / "a"], timeout=30)
    assert res.returncode == 2 and "is not a socket" in res.stderr, res.describe()
    assert_agent_attests(cluster, token, f"127.0.0.1:{cluster.port}", tmp_path)


def test_server_refuses_an_admin_socket_path_that_is_not_a_socket(sigil_bin, tmp_path):
    """`--admin-socket` naming a regular file (here: the CA's own database) used to delete it."""
    ca = tmp_path / "ca"
    assert run([sigil_bin, "ca", "init", "--trust-domain", TRUST_DOMAIN, "--data-dir", ca]).returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    res = run([sigil_bin, "server", "run", "--data-dir", ca, "--listen", f"127.0.0.1:{free_port()}",
               "--admin-socket", victim], timeout=30)
    assert res.returncode != 0 and "is not a socket" in res.stderr, res.describe()
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("args, words", [
    (["--agent-svid-ttl", "5s"], "too short"),
    (["--listen", "localhost:8081"], "must be an IP address"),
    (["--log-level", "bogus"], "log level 'bogus'"),
])
def test_server_settings_are_checked_before_it_serves(sigil_bin, tmp_path, args, words):
    ca = tmp_path / "ca"
    assert run([sigil_bin, "ca", "init", "--trust-domain", TRUST_DOMAIN, "--data-dir", ca]).returncode == 0
    res = run([sigil_bin, "server", "run", "--data-dir", ca, "--admin-socket", tmp_path / "admin.sock", *args], timeout=30)
    assert res.returncode == 2 and words in res.stderr, res.describe()


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize("text, words", [
    ("listen_address: 127.0.0.1:8081\n", "unknown setting 'listen_address'"),
    ("ledger_retension: 30d\n", "unknown setting 'ledger_retension'"),
    (LAUGHS, "anchors"),
    ("listen: [127.0.0.1:8081]\n", "must be one value"),
    ("listen:\n", "has no value"),
    ("listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n", "duplicated key"),
])
def test_server_config_file_is_read_strictly(sigil_bin, tmp_path, text, words):
    """Unknown keys used to be ignored (the default listen address was used), and an alias bomb
    hung the server at gigabytes of memory."""
    ca = tmp_path / "ca"
    assert run([sigil_bin, "ca", "init", "--trust-domain", TRUST_DOMAIN, "--data-dir", ca]).returncode == 0
    config = tmp_path / "server.yaml"
    config.write_text(text)
    res = run([sigil_bin, "server", "run", "--config", config, "--data-dir", ca, "--admin-socket", tmp_path / "admin.sock"],
              timeout=30)
    assert res.returncode == 2 and words in res.stderr, res.describe()


def test_proxy_config_values_are_text_not_yaml_booleans(sigil_bin, tmp_path):
    """`namespace: no` in a proxy config was read as YAML 1.1 `false` and became namespace "false",
    so policies of namespace "no" silently stopped applying. The proxy now refuses the file only
    for what is really wrong with it: here it gets as far as the Workload API (which is missing)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    config = tmp_path / "proxy.yaml"
    config.write_text(f"namespace: no\nlabels: app=x\ninbound: 127.0.0.1:{free_port()}\napp: 127.0.0.1:{free_port()}\n"
                      f"policies: {policies}\nworkload-api: unix://{tmp_path}/missing.sock\nlog-level: bogus\n")
    res = run([sigil_bin, "proxy", "run", "--config", config], timeout=30)
    assert res.returncode == 2 and "--log-level 'bogus'" in res.stderr, res.describe()


def test_kill_switch_with_a_mistyped_policy_path_is_an_error_not_a_false_off(sigil_bin, tmp_path):
    policies = tmp_path / "kpol"
    policies.mkdir()
    assert run([sigil_bin, "proxy", "kill-switch", "on", "--policies", policies, "--reason", "test"]).returncode == 0
    res = run([sigil_bin, "proxy", "kill-switch", "off", "--policies", tmp_path / "kpoll"])
    assert res.returncode == 2 and "does not exist" in res.stderr, res.describe()
    status = run([sigil_bin, "proxy", "kill-switch", "status", "--policies", policies])
    assert status.returncode == 0 and status.stdout.startswith("ON"), status.describe()
    res = run([sigil_bin, "proxy", "kill-switch", "on", "--policies", tmp_path / "nowhere"])
    assert res.returncode == 2 and not (Path.cwd() / "sigil-kill-switch").exists(), res.describe()
    off = run([sigil_bin, "proxy", "kill-switch", "off", "--policies", policies])
    assert off.returncode == 0 and "removed" in off.stdout, off.describe()
    again = run([sigil_bin, "proxy", "kill-switch", "off", "--policies", policies])
    assert again.returncode == 0 and "already OFF" in again.stdout, again.describe()
    # --file never overwrites or deletes what is not a kill switch: a directory, a policy, a database.
    (policies / "api.yaml").write_text("kind: AuthorizationPolicy\n")
    database = tmp_path / "sigil.db"
    database.write_bytes(b"SQLite format 3\x00" + b"\x00" * 4096)
    for target in (policies, policies / "api.yaml", database):
        for action in ("on", "off"):
            res = run([sigil_bin, "proxy", "kill-switch", action, "--file", target])
            assert res.returncode == 2, res.describe()
    assert (policies / "api.yaml").read_text() == "kind: AuthorizationPolicy\n" and database.stat().st_size == 4112


@pytest.mark.parametrize("selector, words", [
    ("unix:uid:00", "write unix:uid:0"),
    ("unix:uid:+0", "write unix:uid:0"),
    ("unix:gid:007", "write unix:gid:7"),
    ("unix:path:/usr/bin/../bin/env", "never matches as written"),
    ("unix:path:/usr/bin/", "never matches as written"),
])
def test_selectors_that_could_never_match_are_refused(cluster, selector, words):
    res = cluster.admin("entry", "create", "--spiffe-id", WORKLOAD, "--parent", AGENT, "--selector", selector)
    assert res.returncode == 2 and words in res.stderr, res.describe()


def test_every_selector_kind_the_attestor_produces_can_be_registered(cluster):
    for selector in ["unix:uid:0", "unix:gid:0", "unix:user:root", "unix:group:root", "unix:path:/usr/bin/env",
                     "unix:supplementary_gid:0", "unix:supplementary_group:root"]:
        res = cluster.admin("entry", "create", "--spiffe-id", WORKLOAD, "--parent", AGENT, "--selector", selector)
        assert res.returncode == 0, res.describe()


def test_entries_are_bounded(cluster):
    args = ["entry", "create", "--spiffe-id", WORKLOAD, "--parent", AGENT]
    for uid in range(33):
        args += ["--selector", f"unix:uid:{uid}"]
    res = cluster.admin(*args)
    assert res.returncode == 2 and "at most 32 selectors" in res.stderr, res.describe()


def test_a_connection_that_never_starts_tls_is_closed_by_the_server(cluster):
    """Idle sockets on the agent port used to stay open forever; enough of them starved the server
    of file descriptors. One that sends nothing is now closed (bounded wait, no timing asserted)."""
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=40) as s:
        assert s.recv(1) == b""  # EOF from the server, not our 40 s timeout (that would raise)
    res = cluster.admin("entry", "list")
    assert res.returncode == 0, res.describe()


def test_audit_report_refuses_an_empty_period(cluster):
    res = run([cluster.bin, "audit", "report", "--since", "1h", "--until", "2h", "--data-dir", cluster.ca_dir])
    assert res.returncode == 2 and "not before" in res.stderr, res.describe()


def test_a_proxy_still_waiting_for_its_svid_stops_on_sigterm(sigil_bin, tmp_path):
    """No agent yet (or no entry, or a wrong --spiffe-id): the proxy waits for an SVID, and SIGTERM
    must still stop it (it used to run on until SIGKILL: a pod's whole grace period)."""
    import signal
    policies = tmp_path / "policies"
    policies.mkdir()
    proxy = Proc([sigil_bin, "proxy", "run", "--workload-api", f"unix://{tmp_path}/none.sock", "--app", f"127.0.0.1:{free_port()}",
                  "--inbound", f"127.0.0.1:{free_port()}", "--namespace", "shop", "--labels", "app=web", "--policies", policies],
                 tmp_path / "proxy.log")
    try:
        wait_for(lambda: "Workload API unavailable" in proxy.output() or not proxy.alive(), 30, "the proxy to wait for an SVID")
        assert proxy.alive(), proxy.output()
        proxy.p.send_signal(signal.SIGTERM)
        assert proxy.p.wait(30) == 0, proxy.output()
    finally:
        proxy.kill()


def test_a_second_server_or_agent_on_one_data_directory_is_refused(cluster, sigil_bin, tmp_path):
    """Two servers on one data directory both rotated the CA (two prepared intermediates, each
    switching to its own); two agents on one renewed one identity twice. The second is refused."""
    res = run([sigil_bin, "server", "run", "--data-dir", cluster.ca_dir, "--listen", f"127.0.0.1:{free_port()}",
               "--admin-socket", tmp_path / "admin.sock"], timeout=30)
    assert res.returncode != 0 and "another sigil server" in res.stderr and "is running on" in res.stderr, res.describe()
    data = tmp_path / "agent"
    first = Proc([sigil_bin, "agent", "run", "--server", f"127.0.0.1:{cluster.port}", "--join-token", cluster.token("node-lock"),
                  "--trust-bundle", cluster.ca_dir / "bundle.pem", "--socket", tmp_path / "a.sock", "--data-dir", data],
                 tmp_path / "agent.log")
    try:
        wait_for(lambda: (data / "agent.json").exists() or not first.alive(), 30, "the first agent to attest")
        assert first.alive(), first.output()
        res = run([sigil_bin, "agent", "run", "--server", f"127.0.0.1:{cluster.port}", "--trust-bundle", cluster.ca_dir / "bundle.pem",
                   "--socket", tmp_path / "b.sock", "--data-dir", data], timeout=30)
        assert res.returncode == 2 and "another sigil agent" in res.stderr, res.describe()
    finally:
        first.stop()


@pytest.mark.parametrize("app", ["10.1.2.3:80", "example.com:80", "0.0.0.0:8080"])
def test_a_proxy_forwards_decrypted_traffic_only_over_loopback(sigil_bin, tmp_path, app):
    res = run([sigil_bin, "proxy", "run", "--workload-api", f"unix://{tmp_path}/none.sock", "--app", app,
               "--inbound", f"127.0.0.1:{free_port()}", "--namespace", "shop", "--labels", "app=web", "--policies", tmp_path], timeout=30)
    assert res.returncode == 2 and "must be on loopback" in res.stderr, res.describe()
    res = run([sigil_bin, "proxy", "run", "--workload-api", f"unix://{tmp_path}/none.sock", "--app", f"127.0.0.1:{free_port()}",
               "--inbound", f"127.0.0.1:{free_port()}", "--namespace", "shop", "--labels", "app=web", "--policies", tmp_path,
               "--outbound", app, "--upstream", f"127.0.0.1:{free_port()}", "--upstream-id", "spiffe://example.org/ns/shop/sa/api"],
              timeout=30)
    assert res.returncode == 2 and "must listen on loopback" in res.stderr, res.describe()


def test_an_auditor_reads_a_read_only_copy_of_the_database(cluster, sigil_bin):
    """A copy of sigil.db the auditor may read but not write (mode 0400, in a directory they
    cannot write): the read-only commands work on it. They used to fail with "attempt to write a
    readonly database"."""
    import os
    import shutil
    import sqlite3
    import tempfile
    if os.getuid() != 0:
        pytest.skip("needs root to run a process as another uid")
    if not all(os.access(p, os.X_OK) for p in [sigil_bin] + [str(q) for q in Path(sigil_bin).parents]):
        pytest.skip("sigil binary not reachable by other users")
    outer = Path(tempfile.mkdtemp(prefix="sigil-ro-", dir="/tmp"))
    try:
        os.chmod(outer, 0o755)
        copy = outer / "copy"
        copy.mkdir()
        source, target = sqlite3.connect(cluster.ca_dir / "sigil.db"), sqlite3.connect(copy / "sigil.db")
        source.backup(target)
        source.close()
        target.close()
        shutil.copy(cluster.ca_dir / "bundle.pem", copy / "bundle.pem")
        for path in [copy, copy / "sigil.db", copy / "bundle.pem"]:
            os.chown(path, 65534, 65534)
        os.chmod(copy / "sigil.db", 0o400)
        os.chmod(copy, 0o500)

        def as_nobody():
            os.setgid(65534)
            os.setuid(65534)
        for command in (["audit", "verify"], ["ca", "status"], ["audit", "graph"], ["bundle", "show"]):
            import subprocess
            res = subprocess.run([str(sigil_bin), *command, "--data-dir", str(copy)], capture_output=True, text=True,
                                 timeout=60, preexec_fn=as_nobody, cwd="/tmp")
            assert res.returncode == 0, (command, res.stdout, res.stderr)
    finally:
        shutil.rmtree(outer, ignore_errors=True)
