#!/usr/bin/env python3
"""Summarizes one bench/proxy.sh run (called by it; reads its work directory from BENCH_* variables).

Prints markdown tables (throughput, latency at a fixed rate, new connections, memory, goals) and
the sigil/nginx ratios; writes the JSON (raw runs + summary) and the latency-percentile plot (PNG).
"""
import datetime
import json
import os
import platform
import re
import statistics
import sys

UNIT = {"us": 1.0, "ms": 1e3, "s": 1e6}
PCTS = (50, 90, 99, 99.9)

def draw_plot(rate, path, cpus):
    """Latency percentiles at 1000 req/s per system, HTTP/1.1 and HTTP/2 side by side (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    colors = {"direct": "#888888", "nginx": "#2b8a3e", "sigil": "#1c5fb8", "sigil-noledger": "#74a9e8"}
    labels = [f"p{q:g}" for q in PCTS]
    for ax, proto, title in ((axes[0], "h1", "HTTP/1.1"), (axes[1], "h2", "HTTP/2")):
        for s in ORDER:
            r = rate.get(f"{proto}/{s}")
            if not r or r.get("p50_us") is None:
                continue
            ys = [r[f"p{q}_us"] / 1000 for q in PCTS]
            ax.plot(labels, ys, marker="o", label=s if s == "direct" else f"{s} pair", color=colors.get(s))
        ax.set_title(f"{title}, 1000 req/s (h2load -c10 --rps 100)")
        ax.set_xlabel("percentile of every request")
        ax.grid(True, alpha=0.3)
        ax.set_yscale("log")
    axes[0].set_ylabel("latency, ms (log scale)")
    axes[0].legend()
    fig.suptitle(f"bench/proxy.sh {datetime.date.today().isoformat()}: sidecar pairs vs direct, "
                 f"{cpus} CPUs, loopback", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


ORDER = ["direct", "nginx", "sigil", "sigil-noledger"]
if len(sys.argv) == 4 and sys.argv[1] == "--plot":
    # python3 bench/summarize_proxy.py --plot RESULT.json OUT.png: redraw a run's plot from its JSON.
    doc = json.load(open(sys.argv[2]))
    draw_plot(doc["fixed_rate"], sys.argv[3], doc["host"]["cpus"])
    print(f"plot: {sys.argv[3]}")
    sys.exit(0)

env = os.environ
work = env["BENCH_WORK"]
clk = int(env["BENCH_CLK_TCK"])


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def num(x, fmt="{:,.0f}"):
    return "–" if x is None else fmt.format(x)


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def pct_of(sorted_us, q):
    if not sorted_us:
        return None
    return float(sorted_us[min(len(sorted_us) - 1, int(len(sorted_us) * q / 100))])


def tsv(name):
    path = os.path.join(work, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def ticks(x):
    return int(x) if x not in ("", None) else None


# ---- parsers ---------------------------------------------------------------------------------
def parse_wrk(text):
    def lat(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        return float(m.group(1)) * UNIT[m.group(2)] if m else None
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    p999 = re.search(r"^p99\.9 (\d+) us$", text, re.M)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": int(total.group(1)) if total else 0,
        "p50_us": lat(50), "p90_us": lat(90), "p99_us": lat(99),
        "p99.9_us": float(p999.group(1)) if p999 else None,
        "errors": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0),
    }


def parse_h2load(text, log_path):
    """h2load's summary plus percentiles from its --log-file (start µs, status, duration µs)."""
    rps = re.search(r"^finished in [\d.]+\w*, ([\d.]+) req/s", text, re.M)
    req = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", text, re.M)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    durations, bad = [], 0
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) < 3:
                    continue
                if not parts[1].startswith("2"):
                    bad += 1
                durations.append(int(parts[2]))
    durations.sort()
    r = {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": int(req.group(4)) if req else len(durations),
        "errors": (int(req.group(5)) + int(req.group(6)) + int(req.group(7)) if req else 0)
                  + (int(codes.group(3)) + int(codes.group(4)) if codes else bad),
        "logged": len(durations),
    }
    for q in PCTS:
        r[f"p{q}_us"] = pct_of(durations, q)
    return r


# ---- throughput: wrk (HTTP/1.1) and h2load -m1 (HTTP/2), 1 and 64 connections ------------------
tput = []
for rnd, system, conns, pt, bt, path in tsv("runs.tsv"):
    r = {"proto": "h1", "round": int(rnd), "system": system, "conns": int(conns), "proxy_ticks": ticks(pt),
         "backend_ticks": ticks(bt)}
    r.update(parse_wrk(open(path).read()))
    tput.append(r)
for system, tag, ot, it, bt, path in tsv("h2.tsv"):
    m = re.match(r"c(\d+)-r(\d+)", tag)
    o, i = ticks(ot), ticks(it)
    r = {"proto": "h2", "round": int(m.group(2)), "system": system, "conns": int(m.group(1)),
         "proxy_ticks": o + i if o is not None and i is not None else None, "backend_ticks": ticks(bt)}
    r.update(parse_h2load(open(path).read(), path[:-4] + ".log"))
    tput.append(r)
for r in tput:
    req = max(r["requests"], 1)
    direct = r["system"] == "direct"
    r["proxy_cpu_us_per_req"] = None if direct or r["proxy_ticks"] is None else r["proxy_ticks"] / clk * 1e6 / req
    r["backend_cpu_us_per_req"] = r["backend_ticks"] / clk * 1e6 / req if r["backend_ticks"] is not None else None

systems = [s for s in ORDER if any(r["system"] == s for r in tput)]
summary = {}
for proto in ("h1", "h2"):
    for c in sorted({r["conns"] for r in tput if r["proto"] == proto}):
        direct = {r["round"]: r for r in tput if r["proto"] == proto and r["system"] == "direct" and r["conns"] == c}
        for s in systems:
            rs = [r for r in tput if r["proto"] == proto and r["system"] == s and r["conns"] == c]
            if not rs:
                continue
            x = {"proto": proto, "system": s, "conns": c, "rounds": len(rs),
                 "rps_median": med(r["rps"] for r in rs),
                 "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs),
                 "proxy_cpu_us_per_req_median": med(r["proxy_cpu_us_per_req"] for r in rs),
                 "backend_cpu_us_per_req_median": med(r["backend_cpu_us_per_req"] for r in rs),
                 "errors": sum(r["errors"] for r in rs)}
            for q in PCTS:
                k = f"p{q}_us"
                x[f"{k}_median"] = med(r[k] for r in rs)
                if s != "direct":
                    x[f"added_{k}_median"] = med(r[k] - direct[r["round"]][k] for r in rs
                                                 if r["round"] in direct and r[k] is not None
                                                 and direct[r["round"]][k] is not None)
            x["proxy_cpu_s_per_10k_req"] = (x["proxy_cpu_us_per_req_median"] / 100
                                            if x["proxy_cpu_us_per_req_median"] is not None else None)
            summary[f"{proto}/{s}/c{c}"] = x

# ---- latency at a fixed rate (h2load -c10 --rps 100 = 1000 req/s) ------------------------------
rate = {}
for system, proto, ot, it, bt, path in tsv("rate.tsv"):
    r = {"proto": proto, "system": system}
    r.update(parse_h2load(open(path).read(), path[:-4] + ".log"))
    req = max(r["requests"], 1)
    for side, t in (("outbound", ticks(ot)), ("inbound", ticks(it))):
        # vCPU per 1000 req/s = (CPU-s / run-s) / (req/s / 1000) = CPU-s × 1000 / requests
        r[f"{side}_vcpu_per_1k_rps"] = None if system == "direct" or t is None else t / clk * 1000 / req
    rate[f"{proto}/{system}"] = r
for proto in ("h1", "h2"):
    d = rate.get(f"{proto}/direct")
    for s in systems:
        r = rate.get(f"{proto}/{s}")
        if r and d and s != "direct":
            for q in PCTS:
                k = f"p{q}_us"
                r[f"added_{k}"] = r[k] - d[k] if r[k] is not None and d[k] is not None else None

# ---- new connections: one full mTLS handshake between the proxies per request ------------------
newconn = {}
for system, tag, ot, it, bt, path in tsv("newconn.tsv"):
    r = parse_wrk(open(path).read())
    r["round"] = tag
    for side, t in (("outbound", ticks(ot)), ("inbound", ticks(it))):
        r[f"{side}_handshakes_per_cpu_s"] = r["requests"] / (t / clk) if t else None
    newconn.setdefault(system, []).append(r)
newconn_summary = {}
for s, rs in newconn.items():
    newconn_summary[s] = {
        "conn_per_s_median": med(r["rps"] for r in rs),
        "conn_per_s_min": min(r["rps"] for r in rs), "conn_per_s_max": max(r["rps"] for r in rs),
        "outbound_handshakes_per_cpu_s_median": med(r["outbound_handshakes_per_cpu_s"] for r in rs),
        "inbound_handshakes_per_cpu_s_median": med(r["inbound_handshakes_per_cpu_s"] for r in rs),
        "errors": sum(r["errors"] for r in rs),
    }

# ---- memory -------------------------------------------------------------------------------------
rss = []
for phase, system, label, pid, kb, hwm, anon in tsv("rss.tsv"):
    rss.append({"phase": phase, "system": system, "process": label, "pid": int(pid),
                "vmrss_kb": int(kb or 0), "vmhwm_kb": int(hwm or 0), "rssanon_kb": int(anon or 0)})
conns_phase = f"conns-{env['BENCH_OPEN_CONNS']}"


def proc_kb(system, phase, key="vmrss_kb"):
    """Per proxy process (nginx: master + workers of one side) → the largest side, in kB."""
    sides = {}
    for r in rss:
        if r["system"] == system and r["phase"] == phase:
            side = r["process"].split()[0]
            sides[side] = sides.get(side, 0) + r[key]
    return max(sides.values()) if sides else None


# ---- ratios and goals ---------------------------------------------------------------------------
ratios = {}
for key, x in summary.items():
    proto, s, c = key.split("/")
    ng = summary.get(f"{proto}/nginx/{c}")
    if s == "sigil" and ng:
        ratios[f"{proto}/{c}"] = {
            "rps": ratio(x["rps_median"], ng["rps_median"]),
            "added_p99": ratio(x.get("added_p99_us_median"), ng.get("added_p99_us_median")),
            "proxy_cpu_per_req": ratio(x["proxy_cpu_us_per_req_median"], ng["proxy_cpu_us_per_req_median"]),
        }
ledger_cost = {}
for proto in ("h1", "h2"):
    for c in (1, 64):
        a, b = summary.get(f"{proto}/sigil/c{c}"), summary.get(f"{proto}/sigil-noledger/c{c}")
        if a and b and b["rps_median"]:
            ledger_cost[f"{proto}/c{c}"] = 1 - a["rps_median"] / b["rps_median"]

goals = []


def goal(name, value, target, ok, fmt):
    goals.append({"goal": name, "value": value, "target": target,
                  "met": None if value is None else bool(ok(value)), "text": fmt(value) if value is not None else "–"})


r64 = ratios.get("h1/c64", {})
goal("sigil pair req/s ÷ nginx pair, HTTP/1.1, 64 conns", r64.get("rps"), "≥ 1.20", lambda v: v >= 1.2, lambda v: f"×{v:.2f}")
goal("sigil pair CPU per request ÷ nginx pair, HTTP/1.1, 64 conns", r64.get("proxy_cpu_per_req"), "≤ 1.00",
     lambda v: v <= 1.0, lambda v: f"×{v:.2f}")
rs, rn = rate.get("h1/sigil", {}), rate.get("h1/nginx", {})
goal("added p99 at 1000 req/s (HTTP/1.1), sigil pair", rs.get("added_p99_us"), "≤ 500 µs",
     lambda v: v <= 500, lambda v: f"{v:.0f} µs")
if rs.get("added_p99_us") is not None and rn.get("added_p99_us") is not None:
    goal("… and ≤ the nginx pair's in the same run", rs["added_p99_us"] - rn["added_p99_us"], "≤ 0 µs",
         lambda v: v <= 0, lambda v: f"{v:+.0f} µs vs nginx's {rn['added_p99_us']:.0f} µs")
vc = [rs.get("outbound_vcpu_per_1k_rps"), rs.get("inbound_vcpu_per_1k_rps")]
goal("vCPU per 1000 req/s per proxy (busier side)", max(vc) if None not in vc else None, "≤ 0.10",
     lambda v: v <= 0.10, lambda v: f"{v:.3f}")
goal("RSS of one proxy idle (larger side)", proc_kb("sigil", "idle"), "≤ 13 MB",
     lambda v: v <= 13 * 1024, lambda v: f"{v / 1024:.1f} MB")
goal("RSS of one proxy at 1000 req/s (larger side)", proc_kb("sigil", "rate-1k"), "≤ 30 MB",
     lambda v: v <= 30 * 1024, lambda v: f"{v / 1024:.1f} MB")
nc = newconn_summary.get("sigil", {})
hs = [nc.get("outbound_handshakes_per_cpu_s_median"), nc.get("inbound_handshakes_per_cpu_s_median")]
goal("full mTLS handshakes per core-second (busier side)", min(hs) if hs and None not in hs else None, "≥ 2,500",
     lambda v: v >= 2500, lambda v: f"{v:,.0f}")
# The ledger phase: sigil and sigil-noledger loaded at the same time, so both see the same machine.
ledger_pairs = {}
aa_note = " [A/A run: LEDGER_AA=1, neither pair had a ledger]" if env.get("BENCH_LEDGER_AA") == "1" else ""
for pair, system, pt, path in tsv("ledger.tsv"):
    r = parse_wrk(open(path).read())
    req = max(r["requests"], 1)
    r["proxy_cpu_us_per_req"] = None if ticks(pt) is None else ticks(pt) / clk * 1e6 / req
    ledger_pairs.setdefault(int(pair), {})[system] = r
# A run in which either pair failed requests (a full ledger spool answers 503 and closes) measured
# something else: it is left out of the cost and named in the output.
bad_ledger_runs = sorted(k for k, p in ledger_pairs.items() if any(r["errors"] for r in p.values()))
ledger_pairs = {k: p for k, p in ledger_pairs.items() if k not in bad_ledger_runs}
paired = None
costs = [1 - p["sigil"]["rps"] / p["sigil-noledger"]["rps"] for p in ledger_pairs.values()
         if "sigil" in p and "sigil-noledger" in p and p["sigil-noledger"]["rps"]]
if costs:
    cpu = [ratio(p["sigil"]["proxy_cpu_us_per_req"], p["sigil-noledger"]["proxy_cpu_us_per_req"])
           for p in ledger_pairs.values() if "sigil" in p and "sigil-noledger" in p]
    paired = {"pairs": len(costs), "cost_median": med(costs), "cost_min": min(costs), "cost_max": max(costs),
              "cpu_per_req_ratio_median": med(cpu),
              "sigil_rps_median": med([p["sigil"]["rps"] for p in ledger_pairs.values() if "sigil" in p]),
              "noledger_rps_median": med([p["sigil-noledger"]["rps"] for p in ledger_pairs.values() if "sigil-noledger" in p]),
              # the proxies' CPU per request under this load (both proxies of a pair), in µs
              "sigil_cpu_us_per_req_median": med([p["sigil"]["proxy_cpu_us_per_req"] for p in ledger_pairs.values()
                                                  if p.get("sigil", {}).get("proxy_cpu_us_per_req") is not None]),
              "noledger_cpu_us_per_req_median": med([p["sigil-noledger"]["proxy_cpu_us_per_req"] for p in ledger_pairs.values()
                                                     if p.get("sigil-noledger", {}).get("proxy_cpu_us_per_req") is not None])}
    goal("ledger cost in req/s (sigil vs sigil-noledger loaded together, HTTP/1.1, 64 conns each)", paired["cost_median"], "< 5 %",
         lambda v: v < 0.05,
         lambda v: f"{v * 100:.1f} % (median of {len(costs)} runs, range {paired['cost_min'] * 100:.1f}…{paired['cost_max'] * 100:.1f} %; "
                   f"proxy CPU per request ×{num(paired['cpu_per_req_ratio_median'], '{:.2f}')}){aa_note}")
elif "h1/c64" in ledger_cost:
    goal("ledger cost in req/s (sigil vs sigil-noledger, HTTP/1.1, 64 conns)", ledger_cost["h1/c64"], "< 5 %",
         lambda v: v < 0.05, lambda v: f"{v * 100:.1f} %")


# ---- output -------------------------------------------------------------------------------------
def lat(us):
    if us is None:
        return "–"
    if abs(us) < 1000:
        return f"{us:.0f} µs"
    return f"{us / 1000:.2f} ms"


print()
print(f"sidecar pair benchmark, {os.cpu_count()} CPUs, nginx {env['BENCH_NGINX_VERSION']}, sigil "
      f"{env['BENCH_SIGIL_BUILD']} build: throughput runs {env['BENCH_DURATION']} s each, medians of interleaved "
      f"rounds (HTTP/1.1: {env['BENCH_ROUNDS']}; HTTP/2: {env.get('BENCH_H2_ROUNDS', '?')})")
print()
print("| proto | system | conns | req/s median (min–max) | p50 | p99 | p99.9 | added p50 / p99 / p99.9 | proxy CPU-s per 10k req |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for x in summary.values():
    added = "–" if x["system"] == "direct" else " / ".join(lat(x[f"added_p{q}_us_median"]) for q in (50, 99, 99.9))
    flag = " ⚠" if x["errors"] else ""
    print(f"| {x['proto']} | {x['system']}{flag} | {x['conns']} | {num(x['rps_median'])} "
          f"({num(x['rps_min'])}–{num(x['rps_max'])}) | {lat(x['p50_us_median'])} | {lat(x['p99_us_median'])} "
          f"| {lat(x['p99.9_us_median'])} | {added} | {num(x['proxy_cpu_s_per_10k_req'], '{:.2f}')} |")
print()
for k, rt in ratios.items():
    proto, c = k.split("/")
    print(f"sigil / nginx, {proto}, {c[1:]} conn(s): req/s ×{num(rt['rps'], '{:.2f}')}, added p99 "
          f"×{num(rt['added_p99'], '{:.2f}')}, proxy CPU per request ×{num(rt['proxy_cpu_per_req'], '{:.2f}')}")
for k, v in ledger_cost.items():
    print(f"ledger cost ({k}): {v * 100:+.1f} % req/s (sigil vs sigil-noledger)")
if paired:
    print(f"ledger cost, {paired['pairs']} runs of both pairs loaded together at 64 conns each: median {paired['cost_median'] * 100:+.1f} % req/s "
          f"(range {paired['cost_min'] * 100:+.1f}…{paired['cost_max'] * 100:+.1f} %; sigil {paired['sigil_rps_median']:,.0f} vs "
          f"{paired['noledger_rps_median']:,.0f} req/s), proxy CPU per request ×{num(paired['cpu_per_req_ratio_median'], '{:.2f}')}"
          + (f" ({paired['sigil_cpu_us_per_req_median']:.0f} vs {paired['noledger_cpu_us_per_req_median']:.0f} µs for both proxies)"
             if paired["sigil_cpu_us_per_req_median"] and paired["noledger_cpu_us_per_req_median"] else "")
          + aa_note)

if rate:
    print()
    print(f"latency at 1000 req/s (h2load -c10 --rps 100, {env['BENCH_RATE_DURATION']} s, percentiles of every request):")
    print()
    print("| proto | system | req/s | p50 | p90 | p99 | p99.9 | added p50 / p99 / p99.9 | vCPU per 1k req/s (out / in) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for k, r in rate.items():
        added = "–" if r["system"] == "direct" else " / ".join(lat(r.get(f"added_p{q}_us")) for q in (50, 99, 99.9))
        vcpu = "–" if r["system"] == "direct" else \
            f"{num(r['outbound_vcpu_per_1k_rps'], '{:.3f}')} / {num(r['inbound_vcpu_per_1k_rps'], '{:.3f}')}"
        flag = " ⚠" if r["errors"] else ""
        print(f"| {r['proto']} | {r['system']}{flag} | {r['rps']:,.0f} | {lat(r['p50_us'])} | {lat(r['p90_us'])} "
              f"| {lat(r['p99_us'])} | {lat(r['p99.9_us'])} | {added} | {vcpu} |")

if newconn_summary:
    print()
    print("new connections (wrk -c16, Connection: close; each a full mTLS 1.3 handshake between the proxies):")
    print()
    print("| system | conn/s median (min–max) | handshakes per CPU-second: outbound / inbound |")
    print("|---|---:|---:|")
    for s, x in newconn_summary.items():
        flag = " ⚠" if x["errors"] else ""
        print(f"| {s}{flag} | {num(x['conn_per_s_median'])} ({num(x['conn_per_s_min'])}–{num(x['conn_per_s_max'])}) "
              f"| {num(x['outbound_handshakes_per_cpu_s_median'])} / {num(x['inbound_handshakes_per_cpu_s_median'])} |")

if rss:
    print()
    phases = [("idle", "idle"), ("rate-1k", "1k req/s"), (conns_phase, f"{env['BENCH_OPEN_CONNS']} conns"),
              ("after", "end of load"), ("idle-after", "idle after")]
    print("memory, VmRSS (RssAnon):")
    print()
    print("| process | " + " | ".join(p[1] for p in phases) + " | peak VmHWM |")
    print("|---|" + "---:|" * (len(phases) + 1))
    keys = []
    for r in rss:
        if (r["system"], r["process"], r["pid"]) not in keys:
            keys.append((r["system"], r["process"], r["pid"]))
    mb = lambda kb: f"{kb / 1024:.1f}" if kb else "–"
    for system, label, pid in keys:
        cells = []
        for phase, _ in phases:
            r = next((r for r in rss if r["phase"] == phase and r["pid"] == pid), None)
            cells.append(f"{mb(r['vmrss_kb'])} ({mb(r['rssanon_kb'])}) MB" if r else "–")
        peak = max((r["vmhwm_kb"] for r in rss if r["pid"] == pid), default=0)
        print(f"| {system} {label} | " + " | ".join(cells) + f" | {mb(peak)} MB |")

print()
print("| goal | measured | target | met |")
print("|---|---:|---:|:---:|")
for g in goals:
    print(f"| {g['goal']} | {g['text']} | {g['target']} | {'–' if g['met'] is None else ('yes' if g['met'] else 'NO')} |")

if int(env["BENCH_BUSY_BEFORE"]) > 15:
    print(f"WARNING: the CPUs were {env['BENCH_BUSY_BEFORE']}% busy before the run started: figures are low and noisy")
if env["BENCH_SIGIL_SKIP"]:
    print(f"sigil pair skipped: {env['BENCH_SIGIL_SKIP']}")
elif env["BENCH_SIGIL_BUILD"] == "debug":
    print(f"WARNING: sigil is a debug build ({env['BENCH_SIGIL']}): its figures mean nothing")
elif env["BENCH_SIGIL_BUILD"] != "release":
    print(f"note: cannot tell whether {env['BENCH_SIGIL']} is a release build")
for k, x in list(summary.items()) + [(f"newconn/{s}", x) for s, x in newconn_summary.items()] + list(rate.items()):
    if x["errors"]:
        print(f"⚠ {k}: {x['errors']} failed requests, non-2xx responses or socket errors (see the JSON)")
if bad_ledger_runs:
    print(f"⚠ ledger runs {', '.join(map(str, bad_ledger_runs))}: failed requests or non-2xx responses "
          "(a full ledger spool answers 503; see the proxies' logs), left out of the ledger cost")
if env["BENCH_LEDGER_ROWS"].strip():
    print(f"\nledger rows written: {env['BENCH_LEDGER_ROWS'].strip()}")
# `sigil-bench ledger-row` after the ledger phase: "key value" pairs, ns per row on a quiet core.
ledger_row = {}
for k, v in zip(*[iter(env.get("BENCH_LEDGER_ROW", "").split())] * 2):
    try:
        ledger_row[k] = int(v)
    except ValueError:
        pass
if ledger_row:
    print("one ledger row on a quiet core (sigil-bench ledger-row): " + ", ".join(f"{k} {v:,}" for k, v in ledger_row.items()))

# ---- plot -----------------------------------------------------------------------------------------
plot = env.get("BENCH_PLOT")
if plot and rate:
    try:
        draw_plot(rate, plot, os.cpu_count())
        print(f"plot: {plot}")
    except Exception as e:  # the tables and JSON still stand without the plot
        print(f"no plot ({type(e).__name__}: {e}); apt-get install python3-matplotlib, then "
              f"python3 bench/summarize_proxy.py --plot {env['BENCH_JSON']} {plot}")

# ---- JSON -----------------------------------------------------------------------------------------
cpu_model = ""
try:
    cpu_model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    pass
doc = {
    "benchmark": "bench/proxy.sh",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": env["BENCH_COMMIT"],
    "host": {"cpus": os.cpu_count(), "cpu_model": cpu_model, "kernel": platform.release(),
             "cpu_busy_percent_before": int(env["BENCH_BUSY_BEFORE"]),
             "loadavg_before": env["BENCH_LOAD_BEFORE"], "loadavg_after": env["BENCH_LOAD_AFTER"]},
    "settings": {"duration_s": int(env["BENCH_DURATION"]), "rounds": int(env["BENCH_ROUNDS"]),
                 "warmup_s": int(env["BENCH_WARMUP"]), "rate_duration_s": int(env["BENCH_RATE_DURATION"]),
                 "open_conns": int(env["BENCH_OPEN_CONNS"]), "nginx_access_log": env["BENCH_ACCESS_LOG"] == "1"},
    "versions": {"nginx": env["BENCH_NGINX_VERSION"], "wrk": env["BENCH_WRK_VERSION"], "openssl": env["BENCH_OPENSSL"]},
    "sigil": {"binary": env["BENCH_SIGIL"], "build": env["BENCH_SIGIL_BUILD"],
              "binary_mtime": env["BENCH_SIGIL_MTIME"] or None, "skipped": env["BENCH_SIGIL_SKIP"] or None,
              "ledger_rows": env["BENCH_LEDGER_ROWS"].strip() or None, "ledger_row_ns": ledger_row or None},
    "method": "medians over interleaved rounds; added pN = median of per-round (system pN - direct pN); proxy CPU = "
              "utime+stime of both proxies' processes during the run / requests; fixed-rate percentiles from "
              "h2load --log-file; vCPU per 1k req/s = CPU-s x 1000 / requests, per proxy side",
    "summary": summary, "ratios_sigil_over_nginx": ratios, "ledger_cost": ledger_cost, "ledger_pairs": paired, "fixed_rate": rate,
    "new_connections": newconn_summary, "goals": goals, "rss": rss, "runs": tput,
}
with open(env["BENCH_JSON"], "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
print(f"\nJSON: {env['BENCH_JSON']}")
