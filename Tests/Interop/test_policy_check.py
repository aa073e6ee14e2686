"""`sigil policy check` as a script would drive it: exact JSON, exit codes 0/1/2."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "deploy" / "policies"


def check(sigil, *args):
    return sigil("policy", "check", "--policies", POLICIES, "--namespace", "prod", "--labels", "app=web,version=v1", *args, "--json")


def test_allow_names_policy_and_rule(sigil):
    res = check(sigil, "--principal", "spiffe://cluster.local/ns/prod/sa/frontend", "--method", "GET", "--path", "/api/items")
    assert res.returncode == 0, res.describe()
    assert res.stdout.strip() == '{"decision":"ALLOW","policy":"prod/web-allow-frontend","rule":0}'


def test_istio_principal_form_and_second_rule(sigil):
    res = check(sigil, "--principal", "cluster.local/ns/monitoring/sa/prometheus", "--path", "/metrics")
    assert res.returncode == 0, res.describe()
    assert json.loads(res.stdout) == {"decision": "ALLOW", "policy": "prod/web-allow-frontend", "rule": 1}


def test_deny_rule_wins(sigil):
    res = check(sigil, "--principal", "spiffe://cluster.local/ns/prod/sa/frontend", "--path", "/admin/users")
    assert res.returncode == 1, res.describe()
    assert res.stdout.strip() == '{"decision":"DENY","policy":"prod/web-deny-admin","rule":0}'


def test_path_normalization_levels_as_istio(sigil):
    """BASE leaves an encoded slash and a double slash alone (CVE-2021-31920's gap, as in Istio);
    DECODE_AND_MERGE_SLASHES, Istio's advice for path policies, sees /admin/users in both."""
    frontend = ("--principal", "spiffe://cluster.local/ns/prod/sa/frontend")
    for path in ("/admin%2Fusers", "//admin/users"):
        res = check(sigil, *frontend, "--path", path)
        assert json.loads(res.stdout)["policy"] != "prod/web-deny-admin", res.describe()
        res = check(sigil, *frontend, "--path", path, "--path-normalization", "DECODE_AND_MERGE_SLASHES")
        assert res.returncode == 1 and json.loads(res.stdout)["policy"] == "prod/web-deny-admin", res.describe()
    res = check(sigil, *frontend, "--path", "//admin/users", "--path-normalization", "MERGE_SLASHES")
    assert res.returncode == 1, res.describe()
    res = check(sigil, *frontend, "--path-normalization", "NONE")
    assert res.returncode == 2 and "DECODE_AND_MERGE_SLASHES" in res.stderr, res.describe()


def test_plaintext_default_deny_has_null_policy(sigil):
    res = check(sigil, "--path", "/api/items")
    assert res.returncode == 1
    assert res.stdout.strip() == '{"decision":"DENY","policy":null,"rule":null}'


def test_tcp_allow_rule_with_http_fields_cannot_match(sigil):
    res = check(sigil, "--principal", "spiffe://cluster.local/ns/prod/sa/frontend", "--tcp", "--port", "8080")
    assert res.returncode == 1
    assert json.loads(res.stdout)["decision"] == "DENY"


def test_load_errors_and_usage_exit_2(sigil, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  action: CUSTOM\n  provider:\n    name: ext\n")
    res = sigil("policy", "check", "--policies", bad, "--namespace", "prod")
    assert res.returncode == 2 and "bad.yaml" in res.stderr and "not supported" in res.stderr, res.describe()
    res = check(sigil, "--principal", "spiffe://Bad/x")
    assert res.returncode == 2, res.describe()
