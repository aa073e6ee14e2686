"""The ledger page (`sigil server run --ui 127.0.0.1:PORT`) end to end: three proxies ship their
ledgers to a real server while web calls api (allowed and denied paths), api calls db, and a
plaintext client is refused by api; then the page, its JSON and its filters are read with urllib,
the graph is compared with `sigil audit graph --json`, and headless Chromium renders the page: the
screenshot's pixels at the SVG's own coordinates must show the nodes and the coloured edges."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from cluster import API, API_FROM_WEB, TRUST_DOMAIN, WEB, Cluster, HTTPEchoApp, wait_for
from interop_util import free_port, run

DB = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/db"
POLICIES = API_FROM_WEB + '    to: [{operation: {notPaths: ["/admin*"]}}]\n'
DB_FROM_API = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: db-from-api, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["{TRUST_DOMAIN}/ns/shop/sa/api"]}}}}]
"""
ALLOWED, DENIED, DB_CALLS = 6, 3, 4
RED = (0xD6, 0x27, 0x28)
GREEN = (0x2C, 0xA0, 0x2C)


class UI:
    def __init__(self, cluster: Cluster, port: int):
        self.c = cluster
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, params: dict | None = None):
        url = self.base + path + ("?" + urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return resp.status, resp.headers, resp.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read().decode()

    def json(self, path: str, params: dict | None = None):
        status, _, body = self.get(path, params)
        assert status == 200, body
        return json.loads(body)


def audit_graph(c: Cluster) -> list[dict]:
    res = run([c.bin, "audit", "graph", "--format", "json", "--data-dir", c.ca_dir], timeout=60)
    assert res.returncode == 0, res.describe()
    return json.loads(res.stdout)


def edge(edges: list[dict], source: str | None, destination: str) -> dict | None:
    return next((e for e in edges if e.get("source") == source and e["destination"] == destination), None)


@pytest.fixture(scope="module")
def ledger_ui(sigil_bin):
    c = Cluster(sigil_bin)
    app = HTTPEchoApp()
    try:
        ui_port = free_port()
        c.start_server(extra=["--ui", f"127.0.0.1:{ui_port}"])
        wait_for(lambda: "ledger page ready" in c.server.output(), 30, "the ledger page to listen")
        uid = os.getuid()
        for ident in (WEB, API, DB):
            c.entry(ident, "node-1", [f"unix:uid:{uid}"])
        c.start_agent("node-1", c.token("node-1"))
        sock = f"unix://{c.socket('node-1')}"
        policies = c.root / "policies"
        policies.mkdir()
        (policies / "shop.yaml").write_text(POLICIES)
        (policies / "db.yaml").write_text(DB_FROM_API)
        api_in, db_in, web_out, api_out = free_port(), free_port(), free_port(), free_port()
        server = f"127.0.0.1:{c.port}"
        common = ["--workload-api", sock, "--app", app.address, "--namespace", "shop", "--policies", policies,
                  "--mtls", "STRICT", "--ledger-server", server]
        c.start_proxy("db", *common, "--spiffe-id", DB, "--inbound", f"127.0.0.1:{db_in}", "--labels", "app=db",
                      "--ledger", c.root / "db.jsonl")
        c.start_proxy("api", *common, "--spiffe-id", API, "--inbound", f"127.0.0.1:{api_in}", "--labels", "app=api",
                      "--outbound", f"127.0.0.1:{api_out}", "--upstream", f"127.0.0.1:{db_in}", "--upstream-id", DB,
                      "--ledger", c.root / "api.jsonl")
        c.start_proxy("web", *common, "--spiffe-id", WEB, "--inbound", f"127.0.0.1:{free_port()}", "--labels", "app=web",
                      "--outbound", f"127.0.0.1:{web_out}", "--upstream", f"127.0.0.1:{api_in}", "--upstream-id", API,
                      "--ledger", c.root / "web.jsonl")

        def call(port: int, path: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                return resp.status
            finally:
                conn.close()

        assert [call(web_out, f"/orders/{i}") for i in range(ALLOWED)] == [200] * ALLOWED
        assert [call(web_out, f"/admin/<script>{i}") for i in range(DENIED)] == [403] * DENIED
        assert [call(api_out, f"/query/{i}") for i in range(DB_CALLS)] == [200] * DB_CALLS
        with pytest.raises((OSError, http.client.HTTPException)):  # STRICT: a plaintext caller gets no answer
            call(api_in, "/plaintext")

        def shipped():
            edges = audit_graph(c)
            web_api, api_db, plain = edge(edges, WEB, API), edge(edges, API, DB), edge(edges, None, API)
            return (web_api and web_api["calls"] == ALLOWED + DENIED and api_db and api_db["calls"] == DB_CALLS
                    and plain and plain["calls"] == 1)
        wait_for(shipped, 45, "every call in the server's ledger", interval=0.5)
        yield UI(c, ui_port)
    finally:
        c.close()
        app.close()


def test_page_is_served_with_the_graph_the_table_and_the_integrity_result(ledger_ui):
    status, headers, html = ledger_ui.get("/ui")
    assert status == 200 and headers["Content-Type"].startswith("text/html"), html[:500]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "<script" not in html  # the denied paths were /admin/<script>N: escaped
    assert html.count("/admin/&lt;script&gt;") == DENIED
    assert "ledger intact:" in html and "from 4 writers" in html  # three proxies and the server's own chain
    for label in ("shop/web", "shop/api", "shop/db", "plaintext"):
        assert f'data-label="{label}"' in html
    assert html.count('<g class="edge deny mtls"') == 1 and html.count('<g class="edge allow mtls"') == 1
    assert html.count('<g class="edge deny plaintext"') == 1
    graph = html[html.index('<svg id="graph"'):html.index("</svg>")]
    assert graph.count('<g class="lock"') == 2  # on the two mTLS edges (the legend has its own)
    head_status, head_headers, head_body = ledger_ui.get("/ui")  # HEAD: same headers, no body
    conn = http.client.HTTPConnection("127.0.0.1", int(ledger_ui.base.rsplit(":", 1)[1]), timeout=10)
    conn.request("HEAD", "/ui")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"" and int(resp.getheader("Content-Length")) > 1000
    conn.close()


def test_graph_json_is_exactly_what_sigil_audit_graph_says(ledger_ui):
    before = audit_graph(ledger_ui.c)
    graph = ledger_ui.json("/ui/graph.json")
    assert graph["edges"] == before == audit_graph(ledger_ui.c)
    web_api = edge(graph["edges"], WEB, API)
    assert web_api["calls"] == ALLOWED + DENIED and web_api["denied"] == DENIED and web_api["overMTLS"] == ALLOWED + DENIED
    api_db = edge(graph["edges"], API, DB)
    assert api_db["calls"] == DB_CALLS and api_db["denied"] == 0 and api_db["overMTLS"] == DB_CALLS
    plain = edge(graph["edges"], None, API)
    assert plain["calls"] == 1 and plain["denied"] == 1 and plain["overMTLS"] == 0
    assert sorted(n["label"] for n in graph["nodes"]) == ["plaintext", "shop/api", "shop/db", "shop/web"]


def test_filters_narrow_rows_and_edges(ledger_ui):
    rows = ledger_ui.json("/ui/rows.json", {"from": WEB, "to": API, "decision": "deny"})
    assert rows["count"] == DENIED and all(r["decision"] == "deny" and r["source"] == WEB for r in rows["rows"])
    assert all(r["path"].startswith("/admin/<script>") for r in rows["rows"])
    assert ledger_ui.json("/ui/rows.json", {"limit": "2"})["count"] == 2
    plain = ledger_ui.json("/ui/rows.json", {"to": API, "decision": "deny", "since": "1h"})
    assert plain["count"] == DENIED + 1 and sum(1 for r in plain["rows"] if r["source"] is None) == 1
    old = {"since": "2020-01-01T00:00:00Z", "until": "2020-01-02T00:00:00Z"}
    assert ledger_ui.json("/ui/rows.json", old)["count"] == 0 and ledger_ui.json("/ui/graph.json", old)["edges"] == []
    # the graph keeps whole edges: decision=deny keeps those with a denial, with all their calls
    denied = ledger_ui.json("/ui/graph.json", {"decision": "deny"})["edges"]
    assert sorted((e.get("source") or "", e["calls"]) for e in denied) == [("", 1), (WEB, ALLOWED + DENIED)]
    assert [e["destination"] for e in ledger_ui.json("/ui/graph.json", {"from": API})["edges"]] == [DB]
    # the page with filters: only the matching rows, the form filled in again
    status, _, html = ledger_ui.get("/ui", {"to": DB, "limit": "3"})
    assert status == 200 and html.count('<tr class="row') == 3 and f'value="{DB}"' in html
    assert html.count('<g class="edge') == 1 and 'data-destination="' + DB + '"' in html


@pytest.mark.parametrize("query,name", [
    ({"since": "yesterday"}, "since"), ({"until": "soon"}, "until"), ({"limit": "0"}, "limit"), ({"limit": "5001"}, "limit"),
    ({"decision": "maybe"}, "decision"), ({"from": "web"}, "from"), ({"to": "https://api"}, "to"),
])
@pytest.mark.parametrize("path", ["/ui", "/ui/rows.json", "/ui/graph.json"])
def test_bad_filters_are_400_naming_the_parameter(ledger_ui, path, query, name):
    status, _, body = ledger_ui.get(path, query)
    assert status == 400, body
    assert f"parameter '{name}'" in body or f"parameter &#39;{name}&#39;" in body, body


def test_other_methods_paths_and_hosts_are_refused(ledger_ui):
    port = int(ledger_ui.base.rsplit(":", 1)[1])

    def ask(method, path, host=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.putrequest(method, path, skip_host=host is not None)
            if host is not None:
                conn.putheader("Host", host)
            conn.putheader("Content-Length", "0")
            conn.endheaders()
            resp = conn.getresponse()
            return resp.status, resp.getheader("Allow"), resp.read()
        finally:
            conn.close()

    assert ask("POST", "/ui")[:2] == (405, "GET, HEAD")
    assert ask("DELETE", "/ui/rows.json")[0] == 405
    assert ask("GET", "/")[0] == 404 and ask("GET", "/ui/nope")[0] == 404
    assert ask("GET", "/ui", host="attacker.example")[0] == 403  # DNS rebinding
    assert ask("GET", "/ui", host=f"localhost:{port}")[0] == 200
    # garbage is a 400 from the HTTP parser, and the server keeps serving
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01 not http\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert ledger_ui.get("/ui/rows.json", {"limit": "1"})[0] == 200
    assert ledger_ui.c.server.alive()


@pytest.mark.parametrize("address", ["0.0.0.0:{port}", "10.1.2.3:{port}", "[::]:{port}", "example.org:{port}", "{port}"])
def test_a_non_loopback_ui_address_is_refused(sigil_bin, tmp_path, address):
    arg = address.format(port=free_port())
    res = run([sigil_bin, "server", "run", "--data-dir", tmp_path / "none", "--admin-socket", tmp_path / "a.sock", "--ui", arg], timeout=30)
    assert res.returncode == 2, res.describe()
    assert "--ui" in res.stderr and ("loopback" in res.stderr), res.describe()


def test_the_ui_config_key_is_checked_too(sigil_bin, tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text(f"ui: 0.0.0.0:{free_port()}\n")
    res = run([sigil_bin, "server", "run", "--config", config, "--data-dir", tmp_path / "none"], timeout=30)
    assert res.returncode == 2 and "loopback" in res.stderr, res.describe()


# --------------------------------------------------------------------------- a real browser

class SVGScan(HTMLParser):
    """The graph's nodes, edges (with their line) and the SVG's place on the page, from Chromium's DOM."""

    def __init__(self):
        super().__init__()
        self.svg: dict = {}
        self.nodes: list[dict] = []
        self.edges: list[dict] = []
        self.labels: list[str] = []
        self._label = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "svg" and a.get("id") == "graph":
            self.svg = a
        elif tag == "g" and "node" in cls:
            self.nodes.append(a)
        elif tag == "g" and "edge" in cls:
            self.edges.append(a)
        elif tag == "line" and "line" in cls and self.edges and "line" not in self.edges[-1]:
            self.edges[-1]["line"] = {k: float(a[k]) for k in ("x1", "y1", "x2", "y2")}
        elif tag == "circle" and self.nodes and "circle" not in self.nodes[-1] and "cx" in a:
            self.nodes[-1]["circle"] = {"cx": float(a["cx"]), "cy": float(a["cy"]), "fill": a["fill"]}
        self._label = tag == "text" and "node-label" in cls

    def handle_data(self, data):
        if self._label:
            self.labels.append(data)
            self._label = False


def rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def near(a, b, tolerance: int) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def pixels_around(image, x: float, y: float, radius: int = 1):
    cx, cy = round(x), round(y)
    return [image.getpixel((cx + dx, cy + dy)) for dx in range(-radius, radius + 1) for dy in range(-radius, radius + 1)]


def test_chromium_renders_the_graph_the_screenshot_shows_it(ledger_ui, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("chromium is not installed (scripts/install-deps.sh installs it)")
    from PIL import Image

    url = ledger_ui.base + "/ui"
    profile = tempfile.mkdtemp(prefix="sigil-chromium-")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000",
             "--force-device-scale-factor=1", "--no-first-run", f"--user-data-dir={profile}"]
    try:
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0 and "</svg>" in dom.stdout, dom.stderr[-2000:]
        png = Path(os.environ.get("SIGIL_UI_SCREENSHOT") or tmp_path / "ledger-ui.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run([*flags, f"--screenshot={png}", url], capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    finally:
        shutil.rmtree(profile, ignore_errors=True)

    scan = SVGScan()
    scan.feed(dom.stdout)
    assert scan.svg, "no <svg id=graph> in the DOM"
    assert scan.svg["viewbox"] == "0 0 960 600" and scan.svg["width"] == "960" and scan.svg["height"] == "600"
    left, top = int(scan.svg["data-page-x"]), int(scan.svg["data-page-y"])
    assert sorted(n["data-label"] for n in scan.nodes) == ["plaintext", "shop/api", "shop/db", "shop/web"]
    assert sorted(scan.labels) == ["plaintext", "shop/api", "shop/db", "shop/web"]

    image = Image.open(png).convert("RGB")
    assert image.size == (1400, 1000)
    # every node's centre pixel is its fill colour
    for node in scan.nodes:
        centre = node["circle"]
        pixel = image.getpixel((round(left + centre["cx"]), round(top + centre["cy"])))
        assert near(pixel, rgb(centre["fill"]), 6), (node["data-id"], pixel, centre["fill"])
    # the edges the DOM draws are the ledger's, and their middles have their colour
    by_pair = {(e["data-source"], e["data-destination"]): e for e in scan.edges}
    assert set(by_pair) == {(WEB, API), (API, DB), ("(plaintext)", API)}
    denied, mtls, plain = by_pair[(WEB, API)], by_pair[(API, DB)], by_pair[("(plaintext)", API)]
    assert (denied["data-calls"], denied["data-denied"], denied["data-mtls"]) == (str(ALLOWED + DENIED), str(DENIED), "true")
    assert (mtls["data-calls"], mtls["data-denied"], mtls["data-mtls"]) == (str(DB_CALLS), "0", "true")
    assert (plain["data-calls"], plain["data-denied"], plain["data-mtls"]) == ("1", "1", "false")
    for e, want, name in ((denied, RED, "denied web→api"), (plain, RED, "denied plaintext→api"), (mtls, GREEN, "mTLS api→db")):
        line = e["line"]
        mx, my = left + (line["x1"] + line["x2"]) / 2, top + (line["y1"] + line["y2"]) / 2
        around = pixels_around(image, mx, my)
        assert any(near(p, want, 40) for p in around), (name, around)
    # red is red, not the mTLS green, and the reverse
    line = denied["line"]
    assert not any(near(p, GREEN, 60) for p in pixels_around(image, left + (line["x1"] + line["x2"]) / 2, top + (line["y1"] + line["y2"]) / 2))
    print(f"screenshot {png} ({image.size[0]}x{image.size[1]}): {len(scan.nodes)} nodes, {len(scan.edges)} edges checked")


def test_a_second_server_on_the_same_ui_port_fails_clearly_and_sigterm_stops_the_page(ledger_ui, sigil_bin, tmp_path):
    """Runs last: it stops the module's server."""
    port = int(ledger_ui.base.rsplit(":", 1)[1])
    other = Cluster(sigil_bin)  # a second CA of its own
    try:
        res = run([sigil_bin, "server", "run", "--data-dir", other.ca_dir, "--listen", f"127.0.0.1:{free_port()}",
                   "--admin-socket", tmp_path / "admin.sock", "--ui", f"127.0.0.1:{port}"], timeout=60)
        assert res.returncode == 2 and f"--ui 127.0.0.1:{port}: cannot listen" in res.stderr, res.describe()
    finally:
        other.close()
    # an open keep-alive connection does not hold the graceful shutdown open
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/ui/rows.json?limit=1")
    assert conn.getresponse().read()
    server = ledger_ui.c.server
    log = Path(server.log_path)
    assert server.stop() == 0, log.read_text()[-3000:]
    assert "ledger page stopped" in log.read_text()
    conn.close()
