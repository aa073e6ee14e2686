"""The example files in deploy/ load as they are: every key of the server, agent and proxy configs
is one the command reads (flags given on the command line override the file's host-specific
paths and addresses), and the example policies are valid Istio YAML for `sigil policy check`."""
from __future__ import annotations

import os
from pathlib import Path

from cluster import API, Cluster, HTTPEchoApp, Proc, wait_for
from interop_util import free_port, run

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_example_configs_and_policies_load(sigil_bin):
    c = Cluster(sigil_bin)
    app = HTTPEchoApp()
    try:
        c.start_server(extra=["--config", DEPLOY / "config/server.yaml"])
        c.entry(API, "node-1", [f"unix:uid:{os.getuid()}"])
        c.start_agent("node-1", c.token("node-1"), extra=["--config", DEPLOY / "config/agent.yaml"])
        port = free_port()
        proxy = c.start_proxy("api", "--config", DEPLOY / "config/proxy-api.yaml", "--workload-api", f"unix://{c.socket('node-1')}",
                              "--inbound", f"127.0.0.1:{port}", "--app", app.address, "--policies", DEPLOY / "policies",
                              "--ledger", c.root / "api-ledger.jsonl", "--ledger-server", f"127.0.0.1:{c.port}",
                              "--metrics", f"127.0.0.1:{free_port()}")
        assert proxy.alive()
        assert "mode=STRICT" in proxy.output() or "STRICT" in proxy.output(), proxy.output()
    finally:
        c.close()
        app.close()
    for policy_check, expected in [
        (["--namespace", "shop", "--labels", "app=api", "--principal", "spiffe://example.org/ns/shop/sa/web",
          "--method", "GET", "--path", "/api/orders"], 0),
        (["--namespace", "shop", "--labels", "app=api", "--principal", "spiffe://example.org/ns/shop/sa/web",
          "--method", "GET", "--path", "/admin"], 1),
        (["--namespace", "prod", "--labels", "app=web", "--principal", "spiffe://cluster.local/ns/prod/sa/frontend",
          "--method", "GET", "--path", "/api/items"], 0),
    ]:
        res = run([sigil_bin, "policy", "check", "--policies", DEPLOY / "policies", *policy_check])
        assert res.returncode == expected, res.describe()
