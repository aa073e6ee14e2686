#!/usr/bin/env bash
# mTLS sidecar benchmark (not a test): what a pair of proxies adds to an HTTP/1.1 call, Sigil beside
# nginx, measured in one run on one machine with the systems interleaved.
#
#   wrk ──HTTP──▶ backend nginx                                            "direct"
#   wrk ──HTTP──▶ nginx (outbound) ══mTLS 1.3══▶ nginx (inbound) ──HTTP──▶ backend   "nginx pair"
#   wrk ──HTTP──▶ sigil proxy (client) ══mTLS══▶ sigil proxy (server) ──▶ backend    "sigil pair"
#
# Method
# - One backend nginx (worker_processes 1) answers `200 hello\n` with keep-alive; every system ends
#   at it, so the difference between a system and "direct" is what its proxy pair adds.
# - nginx pair: the closest nginx equivalent of a Sigil pair: TLS 1.3 only, P-256 ECDSA SVID-shaped
#   certificates (URI SAN spiffe://bench.local/ns/bench/sa/...) issued by an intermediate like
#   Sigil's, client certificate required and verified on the inbound side, server certificate
#   verified on the outbound side, keep-alive pools (64) on both upstream hops, a subject check
#   standing in for the authorization policy and an x-forwarded-client-cert header. nginx cannot
#   check a URI SAN, so the outbound side verifies a DNS SAN (server.bench.local) instead and the
#   inbound side a subject CN; the cost is the same chain verification. access_log is off (set
#   NGINX_ACCESS_LOG=1 for a buffered access log on both proxies, the nearest thing to Sigil's ledger).
# - sigil pair: the real CLI (CA server, agent, two entries for this uid, one ALLOW policy, two
#   `sigil proxy run`), SVIDs from the Workload API. Skipped with a message if `sigil proxy run`
#   does not exist yet or does not start.
# - HTTP/1.1 keep-alive: wrk -t1 at 1 and 64 connections, DURATION seconds per run, ROUNDS rounds;
#   in every round each system runs once per connection count, the order of systems rotating
#   between rounds (the machine's noise is ±15–25 %, so only medians of interleaved rounds rank
#   anything). A WARMUP run per system at 64 connections fills the connection pools first. p99.9
#   comes from wrk's Lua `done` hook (the same histogram as --latency).
# - HTTP/2: h2load -t1 -m1 at 1 and 64 connections, H2_ROUNDS rounds, percentiles from --log-file.
#   nginx's outbound terminates h2c and proxies HTTP/1.1 over its pool; the sigil outbound passes the
#   HTTP/2 connection through (its inbound terminates it).
# - Latency at a fixed rate: h2load -c10 --rps 100 (1000 req/s) for RATE_DURATION seconds, HTTP/1.1
#   (--h1) and HTTP/2, percentiles p50/p90/p99/p99.9 of every request from --log-file; "added" is
#   system − direct. CPU of each proxy side during the run gives vCPU per 1000 req/s.
# - New connections: wrk -c16 with `Connection: close`, so every request is a new connection to the
#   outbound proxy and a new, full mTLS 1.3 handshake between the proxies (nginx: a second outbound
#   server with no upstream pool, no session reuse; the inbound has session cache and tickets off).
#   Handshakes per CPU-second of each side bound what one core can do.
# - CPU: utime+stime of the proxy processes (/proc/PID/stat; nginx: master and worker of both
#   proxies; sigil: both proxy processes, all threads) read before and after each run, divided by the
#   requests completed → CPU-s per 10k requests. The backend's is recorded too.
# - "added pN" in the throughput table is the median over rounds of (system pN − direct pN).
# - RSS: VmRSS (and RssAnon) of each proxy process idle (IDLE_WAIT seconds without traffic), at
#   1000 req/s (3 s before the end of the HTTP/1.1 fixed-rate run), with OPEN_CONNS (1000) keep-alive
#   client connections held open (bench/hold_conns.py), at the end of the HTTP/1.1 runs, idle again
#   IDLE_WAIT seconds after everything, and VmHWM (peak).
# - sigil-noledger: the same pair without --ledger (LEDGER_OFF_PAIR=0 skips it): what the ledger costs.
#   The ledger phase measures that cost on its own: LEDGER_PAIRS (10) runs of LEDGER_DURATION (5) s,
#   each with wrk -c64 on sigil and on sigil-noledger at the same time, so both see the same machine
#   at every moment and the one that needs more CPU per request completes fewer requests; the cost
#   is the median over runs of 1 − sigil req/s ÷ sigil-noledger req/s, and the proxies' CPU per
#   request beside it. LEDGER_DIR puts the spools elsewhere (e.g. /dev/shm); LEDGER_MAX_SIZE
#   (16GiB) is their --ledger-max-size (a full spool answers 503: such runs are left out of the
#   cost). LEDGER_AA=1 starts the "sigil" pair without the ledger too: an A/A run that shows the
#   phase's own bias (should be ~0).
#   After the runs, `sigil-bench ledger-row` (beside $SIGIL) prints one row's cost on a quiet core,
#   step by step: the floor beside the pairs' figure.
#   LEDGER_PIN=1 pins each pair's proxies to a CPU of their own (swapped every run); wrk and the
#   backend still float, so the proxies are not always CPU-bound and the req/s cost reads lower
#   than the CPU-per-request ratio (the unpinned run is the stricter figure).
# - Everything listens on 127.0.0.1 on free ports; every process started here is stopped on exit.
#
#   bash bench/proxy.sh                       # defaults (~17 min on 2 vCPUs)
#   PHASES="h1 rate" ROUNDS=5 bash bench/proxy.sh   # some phases only: h1 h2 rate newconn conns
#   SIGIL=/path/to/sigil bash bench/proxy.sh
#   SIGIL_THREADS=1 bash bench/proxy.sh       # event-loop threads per sigil proxy (default: one per core)
#   KEEP=1 bash bench/proxy.sh                # keep the temp dir (configs, logs, raw outputs)
#   PROFILE=h1 IDLE_WAIT=1 bash bench/proxy.sh       # no benchmark: perf profile of the sigil pair (or h2, newconn;
#                                                    # PROFILE_SYSTEM=sigil-noledger: the pair without the ledger)
#   PROFILE=syscalls IDLE_WAIT=1 bash bench/proxy.sh # no benchmark: system calls per request (strace -c)
#   PROFILE=syscalls SYSCALLS_LOAD=newconn IDLE_WAIT=1 bash bench/proxy.sh  # the same, 16 connections, each request
#                                                    # a new connection (per request = per handshake); SYSCALLS_TOP=N lines
#   PROFILE=ledger IDLE_WAIT=1 bash bench/proxy.sh   # no benchmark: both inbound proxies (ledger on and off) under
#                                                    # one perf record while both pairs are loaded; extra samples per request by symbol
#   PROFILE=h1 PERF_CALLGRAPH=dwarf bash bench/proxy.sh   # call graphs through the Swift runtime (slower)
#   LEDGER_FLAGS="--ledger-sync-ms 60000" PROFILE=ledger bash bench/proxy.sh   # more flags for the ledger pair
#   PHASES=conns CONNS_SETTLE=60 bash bench/proxy.sh   # hold the 1,000 connections a minute (to inspect the proxies)
#
# Prints a markdown table; a full run writes bench/results/proxy-<UTC date>.json (raw runs + summary)
# and redraws docs/bench-latency.png; a run of some PHASES writes /tmp/sigil-bench-proxy-partial.*.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
WARMUP="${WARMUP:-2}"
IDLE_WAIT="${IDLE_WAIT:-25}"
NGINX_ACCESS_LOG="${NGINX_ACCESS_LOG:-0}"
H2_ROUNDS="${H2_ROUNDS:-2}"
RATE_DURATION="${RATE_DURATION:-20}"
LEDGER_PAIRS="${LEDGER_PAIRS:-10}"
LEDGER_DURATION="${LEDGER_DURATION:-5}"
# Where the sigil pair's ledger spools go (default: the work directory, on the root disk).
LEDGER_DIR="${LEDGER_DIR:-}"
# The spools' bound (--ledger-max-size): a full run writes ~1.2 GB of rows with no server to ship
# them to, and a full spool fails closed (503), which would be measured instead of the ledger.
LEDGER_MAX_SIZE="${LEDGER_MAX_SIZE:-16GiB}"
# LEDGER_FLAGS: more ledger flags for the pair with the ledger on (e.g. "--ledger-sync-ms 60000"),
# split on whitespace (no quoting).
read -r -a ledger_flags <<<"${LEDGER_FLAGS:-}"
OPEN_CONNS="${OPEN_CONNS:-1000}"
LEDGER_OFF_PAIR="${LEDGER_OFF_PAIR:-1}"
# 1,000 held connections need ~2,000 descriptors per proxy (downstream + upstream); children inherit this.
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true
CONNS=(1 64)
# PHASES: which parts run (all by default): h1 h2 rate newconn conns ledger.
ALL_PHASES="h1 h2 rate newconn conns ledger"
PHASES="${PHASES:-$ALL_PHASES}"
phase() { [[ " $PHASES " == *" $1 "* ]]; }
# Only a full run (PHASES as its default, in that order) writes the day's result and the docs'
# plot by default; a run of some phases writes to /tmp instead, so it never replaces the full run's
# figures. (PROFILE runs exit before writing either.)
if [ "$PHASES" = "$ALL_PHASES" ]; then
    RESULT_JSON="${RESULT_JSON:-$repo/bench/results/proxy-$(date -u +%Y-%m-%d).json}"
    PLOT="${PLOT:-$repo/docs/bench-latency.png}"
else
    RESULT_JSON="${RESULT_JSON:-/tmp/sigil-bench-proxy-partial.json}"
    PLOT="${PLOT:-/tmp/sigil-bench-proxy-partial.png}"
fi

log() { echo "==> $*" >&2; }
note() { echo "    $*" >&2; }

# Peers (nginx, wrk, h2load, openssl, curl, matplotlib) come from Debian packages: bench/lib.sh.
source "$repo/bench/lib.sh"

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: everything started here is killed (TERM, then KILL) by the EXIT trap.
# ---------------------------------------------------------------------------------------------
started=()
cleanup() {
    local p
    for p in "${started[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for p in "${started[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for p in "${started[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${work:-}" ] && [ -d "$work" ]; then
        if [ "${KEEP:-0}" = 1 ]; then echo "kept: $work" >&2; else rm -rf "$work"; fi
    fi
}
trap cleanup EXIT

# free_ports N: N distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# children_of PID: the direct children of PID (nginx workers of a master), from /proc.
children_of() {
    local s line f
    for s in /proc/[0-9]*/stat; do
        line="$(cat "$s" 2>/dev/null)" || continue
        read -r -a f <<<"${line##*) }"
        if [ "${f[1]}" = "$1" ]; then s="${s#/proc/}"; echo "${s%/stat}"; fi
    done
}

# cpu_ticks PID...: utime+stime (clock ticks) summed over PIDs; a process's stat covers all threads.
cpu_ticks() {
    local total=0 p line f
    for p in "$@"; do
        line="$(cat "/proc/$p/stat" 2>/dev/null)" || { echo "process $p is gone" >&2; return 1; }
        read -r -a f <<<"${line##*) }"   # f[0] is field 3 (state): utime is field 14, stime 15
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null || return 1; done; }

# wait_http URL SECONDS: until URL answers 200 (curl -f), or fail.
wait_http() {
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        curl -sf -o /dev/null --max-time 2 "$1" && return 0
        sleep 0.2
    done
    return 1
}

# ---------------------------------------------------------------------------------------------
# Test PKI for the nginx pair: root → intermediate → two leaf certificates shaped like X509-SVIDs
# (P-256, one URI SAN, digitalSignature, serverAuth+clientAuth, CA:false). Files hold leaf+intermediate.
# ---------------------------------------------------------------------------------------------
make_pki() {
    local d="$1"
    mkdir -p "$d" && chmod 700 "$d"
    cat > "$d/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
[dn]
[root]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[intermediate]
basicConstraints = critical,CA:true,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = URI:spiffe://bench.local/ns/bench/sa/client
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[server]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = URI:spiffe://bench.local/ns/bench/sa/server,DNS:server.bench.local
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
    local name
    for name in root intermediate client server; do
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/$name.key" 2>/dev/null
    done
    openssl req -x509 -new -key "$d/root.key" -subj "/O=bench.local/CN=bench root" -days 2 -sha256 \
        -config "$d/openssl.cnf" -extensions root -out "$d/ca.pem"
    sign_cert() { # sign_cert NAME SUBJECT ISSUER_NAME ISSUER_PEM
        openssl req -new -key "$d/$1.key" -subj "$2" -config "$d/openssl.cnf" -out "$d/$1.csr"
        openssl x509 -req -in "$d/$1.csr" -CA "$4" -CAkey "$d/$3.key" -set_serial "0x$(openssl rand -hex 12)" \
            -days 1 -sha256 -extfile "$d/openssl.cnf" -extensions "$1" -out "$d/$1.crt" 2>/dev/null
    }
    sign_cert intermediate "/O=bench.local/CN=bench intermediate" root "$d/ca.pem"
    sign_cert client "/O=bench.local/CN=client" intermediate "$d/intermediate.crt"
    sign_cert server "/O=bench.local/CN=server" intermediate "$d/intermediate.crt"
    for name in client server; do
        cat "$d/$name.crt" "$d/intermediate.crt" > "$d/$name.pem"
        openssl verify -x509_strict -CAfile "$d/ca.pem" -untrusted "$d/intermediate.crt" "$d/$name.crt" >/dev/null
    done
}

# ---------------------------------------------------------------------------------------------
# nginx instances: each its own prefix, config, pid file and logs, worker_processes 1, run with
# `daemon off` in the background so its master is our child.
# ---------------------------------------------------------------------------------------------
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# nginx_head DIR [ACCESS_LOG_DIRECTIVE]: the part every instance shares (access_log off by default).
nginx_head() {
    local d="$1" alog="${2:-access_log off;}" temp="" m
    # Temp paths inside DIR (the compiled-in defaults may not be writable), for the modules built in.
    for m in client_body proxy fastcgi uwsgi scgi; do
        if [ "$m" = client_body ] || ! "$NGINX" -V 2>&1 | grep -q -- "--without-http_${m}_module"; then
            temp+="    ${m}_temp_path $d/tmp/$m;"$'\n'
        fi
    done
    mkdir -p "$d/tmp"
    cat <<EOF
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
    $alog
    keepalive_timeout 75s;
    keepalive_requests 1000000;   # the default (1000) would reconnect wrk and the pools every 1000 requests
$temp
EOF
}

# start_nginx NAME: starts \$work/NAME/nginx.conf; sets nginx_master[NAME] and nginx_workers[NAME].
declare -A nginx_master nginx_workers
start_nginx() {
    local d="$work/$1"
    "$NGINX" -t -q -p "$d" -c "$d/nginx.conf" -e "$d/error.log" || { cat "$d/error.log" >&2; exit 1; }
    "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log" -g 'daemon off;' 2>>"$d/error.log" &
    local pid=$!
    started+=("$pid")
    local w=""
    for _ in $(seq 100); do
        w="$(children_of "$pid")"
        [ -n "$w" ] && break
        alive "$pid" || { echo "nginx $1 exited:" >&2; cat "$d/error.log" >&2; exit 1; }
        sleep 0.1
    done
    [ -n "$w" ] || { echo "nginx $1 started no worker" >&2; exit 1; }
    nginx_master[$1]="$pid"
    nginx_workers[$1]="$(echo $w)"
}

access_log_line() { # a buffered access log when NGINX_ACCESS_LOG=1, else none
    if [ "$NGINX_ACCESS_LOG" = 1 ]; then echo "access_log $1 combined buffer=64k flush=1s;"; else echo "access_log off;"; fi
}

setup_backend() {
    local d="$work/backend"
    mkdir -p "$d"
    { nginx_head "$d"; cat <<EOF
    server {
        listen 127.0.0.1:$port_backend backlog=4096;
        listen 127.0.0.1:$port_backend_h2 http2 backlog=4096;   # HTTP/2 prior knowledge, for h2load
        location / { return 200 "hello\n"; }
    }
}
EOF
    } > "$d/nginx.conf"
    start_nginx backend
    wait_http "http://127.0.0.1:$port_backend/" 10 || { echo "backend nginx does not answer" >&2; exit 1; }
}

setup_nginx_pair() {
    local pki="$work/pki" d
    # inbound: terminates mTLS 1.3, requires a client certificate chaining to the CA, checks the
    # subject (stand-in for the authorization policy), forwards over a keep-alive pool.
    d="$work/nginx-in"; mkdir -p "$d"
    { nginx_head "$d" "$(access_log_line "$d/access.log")"; cat <<EOF
    map \$ssl_client_s_dn \$bench_allowed {
        default 0;
        "~(^|,)CN=client(,|\$)" 1;
    }
    upstream app {
        server 127.0.0.1:$port_backend;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }
    server {
        listen 127.0.0.1:$port_nginx_in ssl backlog=4096;
        ssl_protocols TLSv1.3;
        ssl_certificate $pki/server.pem;
        ssl_certificate_key $pki/server.key;
        ssl_client_certificate $pki/ca.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_session_cache off;        # full handshakes only (the new-connection test)
        ssl_session_tickets off;
        location / {
            if (\$bench_allowed = 0) { return 403; }
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-Client-Cert "Hash=\$ssl_client_fingerprint;Subject=\"\$ssl_client_s_dn\"";
        }
    }
}
EOF
    } > "$d/nginx.conf"

    # outbound: plain HTTP from the app on loopback, originates mTLS 1.3 to the inbound proxy with
    # the client certificate, verifies the server's chain and name, keeps a pool of 64 connections.
    local upstream_tls="proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate $pki/client.pem;
            proxy_ssl_certificate_key $pki/client.key;
            proxy_ssl_trusted_certificate $pki/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name server.bench.local;"
    d="$work/nginx-out"; mkdir -p "$d"
    { nginx_head "$d" "$(access_log_line "$d/access.log")"; cat <<EOF
    upstream inbound {
        server 127.0.0.1:$port_nginx_in;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }
    # New-connection test: no upstream pool and no session reuse, so every client connection costs
    # one full mTLS handshake between the two nginx, as every new app connection does in a Sigil pair.
    upstream inbound_fresh {
        server 127.0.0.1:$port_nginx_in;
    }
    server {
        listen 127.0.0.1:$port_nginx_out_nc backlog=4096;
        location / {
            proxy_pass https://inbound_fresh;
            proxy_http_version 1.1;
            $upstream_tls
            proxy_ssl_session_reuse off;
        }
    }
    server {
        listen 127.0.0.1:$port_nginx_out backlog=4096;
        listen 127.0.0.1:$port_nginx_out_h2 http2 backlog=4096;   # the app speaking HTTP/2 (h2c)
        location / {
            proxy_pass https://inbound;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            $upstream_tls
            proxy_ssl_session_reuse on;
        }
    }
}
EOF
    } > "$d/nginx.conf"
    start_nginx nginx-in
    start_nginx nginx-out
    local body
    body="$(curl -sf --max-time 5 "http://127.0.0.1:$port_nginx_out/")" || true
    if [ "$body" != "hello" ]; then
        echo "nginx pair does not answer (got '$body')" >&2
        tail -5 "$work/nginx-out/error.log" "$work/nginx-in/error.log" >&2
        exit 1
    fi
    # A client without a certificate must be refused by the inbound proxy (mTLS is really on).
    local code
    code="$(curl -sk -o /dev/null -w '%{http_code}' --max-time 5 "https://127.0.0.1:$port_nginx_in/" || true)"
    [ "$code" = 400 ] || { echo "inbound nginx answered $code without a client certificate (expected 400)" >&2; exit 1; }
}

# ---------------------------------------------------------------------------------------------
# Sigil pair. Returns non-zero (after saying why) when it cannot run; the rest of the bench goes on.
# ---------------------------------------------------------------------------------------------
sigil_available() {
    if [ ! -x "$SIGIL" ]; then
        sigil_skip="no sigil binary at $SIGIL (swift build -c release --product sigil)"; return 1
    fi
    local help
    help="$("$SIGIL" proxy run --help 2>&1 || true)"
    # An unknown subcommand makes ArgumentParser print the top-level help, so look for the usage line.
    if ! grep -q "USAGE: sigil proxy run" <<<"$help"; then
        sigil_skip="$SIGIL has no 'proxy run' subcommand yet"; return 1
    fi
    local flag missing=()
    for flag in --workload-api --inbound --app --namespace --labels --policies --mtls --spiffe-id \
                --outbound --upstream --upstream-id; do
        grep -q -- "$flag" <<<"$help" || missing+=("$flag")
    done
    if ((${#missing[@]})); then
        sigil_skip="'sigil proxy run' lacks ${missing[*]}"; return 1
    fi
    proxy_extra=()
    if grep -q -- "--ledger" <<<"$help"; then sigil_ledger=1; else sigil_ledger=0; fi
    grep -q -- "--log-level" <<<"$help" && proxy_extra+=(--log-level warning)
    # SIGIL_THREADS=N: event-loop threads per proxy (default: the proxy's own, one per core).
    [ -n "${SIGIL_THREADS:-}" ] && proxy_extra+=(--threads "$SIGIL_THREADS")
    return 0
}

setup_sigil_pair() {
    local d="$work/sigil" uid td=bench.local agent="spiffe://bench.local/sigil/agent/bench"
    uid="$(id -u)"
    mkdir -p "$d/policies"
    export SIGIL_ADMIN_SOCKET="$d/admin.sock"
    # As scripts/demo.sh: CA, server, wait for the admin socket, entries, join token, agent, wait
    # until the Workload API serves both SVIDs.
    # (Called from an `if`, so set -e is off in here: every step checks its own status.)
    "$SIGIL" ca init --trust-domain "$td" --data-dir "$d/ca" >/dev/null 2>"$d/ca-init.log" \
        || { sigil_skip="sigil ca init failed: $(tail -1 "$d/ca-init.log")"; return 1; }
    "$SIGIL" server run --data-dir "$d/ca" --listen "127.0.0.1:$port_sigil_server" \
        --admin-socket "$d/admin.sock" --log-level warning 2>"$d/server.log" &
    started+=($!)
    for _ in $(seq 100); do [ -S "$d/admin.sock" ] && break; sleep 0.1; done
    [ -S "$d/admin.sock" ] || { sigil_skip="sigil server did not start: $(tail -3 "$d/server.log")"; return 1; }
    local sa
    for sa in client server; do
        "$SIGIL" entry create --spiffe-id "spiffe://$td/ns/bench/sa/$sa" --parent "$agent" \
            --selector "unix:uid:$uid" --admin-socket "$d/admin.sock" >/dev/null 2>"$d/entry.log" \
            || { sigil_skip="sigil entry create failed: $(tail -1 "$d/entry.log")"; return 1; }
    done
    local token
    token="$("$SIGIL" token create --agent-id "$agent" --admin-socket "$d/admin.sock" 2>"$d/token.log")" \
        || { sigil_skip="sigil token create failed: $(tail -1 "$d/token.log")"; return 1; }
    "$SIGIL" agent run --server "127.0.0.1:$port_sigil_server" --join-token "$token" \
        --trust-bundle "$d/ca/bundle.pem" --socket "$d/agent.sock" --data-dir "$d/agent" \
        --log-level warning 2>"$d/agent.log" &
    started+=($!)
    local ok=0 svids
    for _ in $(seq 150); do
        svids="$("$SIGIL" svid fetch --socket "$d/agent.sock" --json 2>/dev/null || true)"
        if grep -q "sa/client" <<<"$svids" && grep -q "sa/server" <<<"$svids"; then ok=1; break; fi
        sleep 0.2
    done
    ((ok)) || { sigil_skip="the agent did not serve both SVIDs in 30 s: $(tail -3 "$d/agent.log")"; return 1; }

    cat > "$d/policies/allow-client.yaml" <<'EOF'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-client
  namespace: bench
spec:
  selector:
    matchLabels:
      app: server
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["bench.local/ns/bench/sa/client"]
EOF

    start_sigil_pair sigil "$port_sigil_in" "$port_sigil_in2" "$port_sigil_out" "$(if [ "${LEDGER_AA:-0}" = 1 ]; then echo 0; else echo "$sigil_ledger"; fi)" || return 1
    sigil_server_pid="${pair_server[sigil]}"; sigil_client_pid="${pair_client[sigil]}"
}

# start_sigil_pair NAME INBOUND_PORT CLIENT_INBOUND_PORT OUTBOUND_PORT LEDGER(0|1): two `sigil proxy
# run` (server side STRICT inbound → backend with the policy; client side outbound → mTLS → the
# server side, which must prove .../sa/server); sets pair_server[NAME] and pair_client[NAME].
declare -A pair_server pair_client
start_sigil_pair() {
    local name="$1" in_port="$2" in2_port="$3" out_port="$4" with_ledger="$5"
    local d="$work/sigil" td=bench.local ledger_in=() ledger_out=()
    if ((with_ledger)); then
        ledger_in=(--ledger "$LEDGER_DIR/ledger-$name-server.jsonl" --ledger-max-size "$LEDGER_MAX_SIZE" "${ledger_flags[@]}")
        ledger_out=(--ledger "$LEDGER_DIR/ledger-$name-client.jsonl" --ledger-max-size "$LEDGER_MAX_SIZE" "${ledger_flags[@]}")
    fi
    "$SIGIL" proxy run --workload-api "unix://$d/agent.sock" --spiffe-id "spiffe://$td/ns/bench/sa/server" \
        --inbound "127.0.0.1:$in_port" --app "127.0.0.1:$port_backend" \
        --namespace bench --labels app=server --policies "$d/policies" --mtls STRICT \
        "${ledger_in[@]}" "${proxy_extra[@]}" >"$d/proxy-$name-server.log" 2>&1 &
    pair_server[$name]=$!
    started+=($!)
    "$SIGIL" proxy run --workload-api "unix://$d/agent.sock" --spiffe-id "spiffe://$td/ns/bench/sa/client" \
        --inbound "127.0.0.1:$in2_port" --app "127.0.0.1:$port_backend" \
        --namespace bench --labels app=client --policies "$d/policies" \
        --outbound "127.0.0.1:$out_port" --upstream "127.0.0.1:$in_port" \
        --upstream-id "spiffe://$td/ns/bench/sa/server" \
        "${ledger_out[@]}" "${proxy_extra[@]}" >"$d/proxy-$name-client.log" 2>&1 &
    pair_client[$name]=$!
    started+=($!)
    local sp="${pair_server[$name]}" cp="${pair_client[$name]}"
    # Up to 60 s for both proxies to fetch their SVIDs and answer through the pair; stop early if one exits.
    local deadline=$((SECONDS + 60)) up=0
    while ((SECONDS < deadline)); do
        if curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$out_port/"; then up=1; break; fi
        alive "$sp" "$cp" || break
        sleep 0.2
    done
    if ((!up)); then
        if alive "$sp" "$cp"; then
            sigil_skip="the $name pair did not answer 200 within 60 s (last try: $(curl -sS -o /dev/null --max-time 5 \
                -w 'HTTP %{http_code}' "http://127.0.0.1:$out_port/" 2>&1 | tr '\n' ' ' || true))"
        else
            sigil_skip="a $name proxy exited at startup: $(cat "$d/proxy-$name-server.log" "$d/proxy-$name-client.log" | grep -v '^\s*$' | tail -1)"
        fi
        note "server proxy log: $(tail -3 "$d/proxy-$name-server.log" | tr '\n' ' ')"
        note "client proxy log: $(tail -3 "$d/proxy-$name-client.log" | tr '\n' ' ')"
        return 1
    fi
    local body
    body="$(curl -sf --max-time 5 "http://127.0.0.1:$out_port/" || true)"
    [ "$body" = "hello" ] || { sigil_skip="the $name pair answered '$body', not the backend's 'hello'"; return 1; }
}

# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
declare -A url proxy_pids
record_rss() { # record_rss PHASE SYSTEM LABEL PID
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(status_kb "$4" VmRSS)" "$(status_kb "$4" VmHWM)" \
        "$(status_kb "$4" RssAnon)" >> "$work/rss.tsv"
}
record_all_rss() {
    local sys
    for sys in "${systems[@]}"; do record_sys_rss "$1" "$sys"; done
}
record_sys_rss() { # record_sys_rss PHASE SYSTEM
    local sys="$2" w
    case "$sys" in
    nginx)
        record_rss "$1" nginx "outbound master" "${nginx_master[nginx-out]}"
        for w in ${nginx_workers[nginx-out]}; do record_rss "$1" nginx "outbound worker" "$w"; done
        record_rss "$1" nginx "inbound master" "${nginx_master[nginx-in]}"
        for w in ${nginx_workers[nginx-in]}; do record_rss "$1" nginx "inbound worker" "$w"; done ;;
    sigil*)
        record_rss "$1" "$sys" "client proxy" "${pair_client[$sys]}"
        record_rss "$1" "$sys" "server proxy" "${pair_server[$sys]}" ;;
    esac
}

# measure SYSTEM CONNS ROUND: one wrk run; raw output kept, CPU deltas appended to runs.tsv.
measure() {
    local sys="$1" conns="$2" round="$3" out="$work/runs/$1-c$2-r$3.txt"
    local p0 p1 b0 b1
    p0="$(cpu_ticks ${proxy_pids[$sys]})"; b0="$(cpu_ticks $backend_pids)"
    wrk -t1 -c"$conns" -d"${DURATION}s" --latency -s "$work/p999.lua" "${url[$sys]}" > "$out" 2>&1 || true
    # A proxy that died during the run leaves its CPU figure empty (and the run shows errors).
    p1="$(cpu_ticks ${proxy_pids[$sys]})" || p1=""; b1="$(cpu_ticks $backend_pids)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$sys" "$conns" "${p1:+$((p1 - p0))}" "$((b1 - b0))" "$out" >> "$work/runs.tsv"
    note "round $round  $(printf '%-6s c=%-3s' "$sys" "$conns")  $(awk '/Requests\/sec/ {r=$2} $1=="99%" {p=$2} END {printf "%s req/s  p99 %s", r, p}' "$out")"
}

# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
bench_install_peers
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# Which sigil: $SIGIL, else the release build if there is one, else the debug build.
sigil_build="unknown"
if [ -z "${SIGIL:-}" ]; then
    if [ -x .build/release/sigil ]; then
        SIGIL="$repo/.build/release/sigil"
        # `sigil proxy run` runs the sigil-proxy binary beside it: both must be current.
        for bin in sigil sigil-proxy; do
            if [ -x ".build/debug/$bin" ] && { [ ! -x ".build/release/$bin" ] || [ ".build/debug/$bin" -nt ".build/release/$bin" ]; }; then
                note "note: .build/debug/$bin is newer than .build/release/$bin; the release build may be stale"
                note "      (swift build -c release --product sigil && swift build -c release --product sigil-proxy)"
            fi
        done
    else
        SIGIL="$repo/.build/debug/sigil"
    fi
fi
case "$SIGIL" in */release/*) sigil_build=release ;; */debug/*) sigil_build=debug ;; esac

# Anything else running (a swift build) makes the figures low and noisy: say so, and record the load.
# busy_percent: share of all CPUs busy over one second (from /proc/stat).
busy_percent() {
    local a b
    a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
    local total=0 i
    for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
    local idle=$((b[4] - a[4] + b[5] - a[5]))
    echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
busy_before="$(busy_percent)"
if ((busy_before > 15)); then
    note "WARNING: the CPUs are ${busy_before}% busy before starting (load $load_before): something else is running,"
    note "         so the figures will be low and noisy"
fi

work="$(mktemp -d /tmp/sigil-bench-proxy.XXXXXX)"
[ -n "$LEDGER_DIR" ] || LEDGER_DIR="$work/sigil"
chmod 755 "$work"
mkdir -p "$work/runs"
: > "$work/runs.tsv"; : > "$work/rss.tsv"
# wrk's --latency stops at p99; its Lua hook gives p99.9 from the same histogram (µs).
cat > "$work/p999.lua" <<'EOF'
done = function(summary, latency, requests)
  io.write(string.format("p99.9 %d us\n", latency:percentile(99.9)))
end
EOF

read -r port_backend port_backend_h2 port_nginx_in port_nginx_out port_nginx_out_h2 port_nginx_out_nc \
    port_sigil_server port_sigil_in port_sigil_in2 port_sigil_out port_nl_in port_nl_in2 port_nl_out \
    <<<"$(free_ports 13)"

log "test PKI (root → intermediate → P-256 leaves with SPIFFE URI SANs)"
make_pki "$work/pki"
log "backend nginx on 127.0.0.1:$port_backend (h2c on $port_backend_h2)"
setup_backend
backend_pids="${nginx_master[backend]} ${nginx_workers[backend]}"
systems=(direct)
declare -A h2url ncurl out_pids in_pids
url[direct]="http://127.0.0.1:$port_backend/"
h2url[direct]="http://127.0.0.1:$port_backend_h2/"
proxy_pids[direct]=""

log "nginx pair: 127.0.0.1:$port_nginx_out → mTLS → 127.0.0.1:$port_nginx_in → backend"
setup_nginx_pair
systems+=(nginx)
url[nginx]="http://127.0.0.1:$port_nginx_out/"
h2url[nginx]="http://127.0.0.1:$port_nginx_out_h2/"
ncurl[nginx]="http://127.0.0.1:$port_nginx_out_nc/"
out_pids[nginx]="${nginx_master[nginx-out]} ${nginx_workers[nginx-out]}"
in_pids[nginx]="${nginx_master[nginx-in]} ${nginx_workers[nginx-in]}"
proxy_pids[nginx]="${out_pids[nginx]} ${in_pids[nginx]}"

sigil_skip=""; sigil_ledger=0; sigil_server_pid=""; sigil_client_pid=""; proxy_extra=()
log "sigil pair ($SIGIL, $sigil_build build)"
if sigil_available && setup_sigil_pair; then
    systems+=(sigil)
    url[sigil]="http://127.0.0.1:$port_sigil_out/"
    h2url[sigil]="${url[sigil]}"     # the outbound sniffs the HTTP/2 preface and offers h2 upstream
    ncurl[sigil]="${url[sigil]}"     # every new app connection is a new mTLS connection upstream
    out_pids[sigil]="$sigil_client_pid"; in_pids[sigil]="$sigil_server_pid"
    proxy_pids[sigil]="$sigil_server_pid $sigil_client_pid"
    note "127.0.0.1:$port_sigil_out → mTLS → 127.0.0.1:$port_sigil_in → backend"
    case "$sigil_build" in
    debug) note "WARNING: a debug build of sigil: its figures mean nothing (swift build -c release --product sigil)" ;;
    unknown) note "note: cannot tell from its path whether $SIGIL is a release build" ;;
    esac
    # The same pair without the ledger: what the ledger costs (LEDGER_OFF_PAIR=0 skips it).
    if [ "$LEDGER_OFF_PAIR" = 1 ] && ((sigil_ledger)); then
        log "sigil pair without the ledger (sigil-noledger)"
        if start_sigil_pair sigil-noledger "$port_nl_in" "$port_nl_in2" "$port_nl_out" 0; then
            systems+=(sigil-noledger)
            url[sigil-noledger]="http://127.0.0.1:$port_nl_out/"
            h2url[sigil-noledger]="${url[sigil-noledger]}"
            out_pids[sigil-noledger]="${pair_client[sigil-noledger]}"; in_pids[sigil-noledger]="${pair_server[sigil-noledger]}"
            proxy_pids[sigil-noledger]="${pair_server[sigil-noledger]} ${pair_client[sigil-noledger]}"
        else
            note "SKIPPED sigil-noledger: $sigil_skip"; sigil_skip=""
        fi
    fi
else
    note "SKIPPED: $sigil_skip"
fi

log "idle for ${IDLE_WAIT}s before the first memory reading"
sleep "$IDLE_WAIT"
record_all_rss idle
log "warm-up: ${WARMUP}s at 64 connections per system (not counted)"
for sys in "${systems[@]}"; do wrk -t1 -c64 -d"${WARMUP}s" "${url[$sys]}" >/dev/null 2>&1 || true; done

# PROFILE=h1|h2|newconn: instead of the benchmark, one DURATION-second run (64 connections; newconn:
# 16, each request a new connection) through the sigil pair under `perf record` (both proxies, call graphs), then the hottest symbols per proxy.
# PROFILE=syscalls: instead, `strace -c` on both proxies during a 5 s HTTP/1.1 run at 64 connections
# (SYSCALLS_LOAD=newconn: 16 connections, each request on a new one): system calls per request by
# kind, the SYSCALLS_TOP (12) most frequent (strace slows the proxies; the counts are what matter).
if [ "${PROFILE:-}" = syscalls ]; then
    command -v strace >/dev/null || { echo "PROFILE=syscalls needs strace (apt-get install strace)" >&2; exit 1; }
    psys="${PROFILE_SYSTEM:-sigil}"  # or sigil-noledger
    [ -n "${pair_server[$psys]:-}" ] || { echo "PROFILE=syscalls needs the $psys pair, which did not start: $sigil_skip" >&2; exit 1; }
    tracers=()
    for side in server client; do
        pid="${pair_server[$psys]}"; [ "$side" = client ] && pid="${pair_client[$psys]}"
        strace -c -f -qq -p "$pid" -o "$work/strace-$side.txt" &
        tracers+=($!)
    done
    sleep 1
    case "${SYSCALLS_LOAD:-h1}" in h1|newconn) ;; *) echo "SYSCALLS_LOAD must be h1 or newconn, not '$SYSCALLS_LOAD'" >&2; exit 2 ;; esac
    if [ "${SYSCALLS_LOAD:-h1}" = newconn ]; then  # each request a new connection: per handshake
        requests="$(wrk -t1 -c16 -d5s -H "Connection: close" "${url[$psys]}" | awk '/requests in/ {print $1}')"
    else
        requests="$(wrk -t1 -c64 -d5s "${url[$psys]}" | awk '/requests in/ {print $1}')"
    fi
    kill -INT "${tracers[@]}" 2>/dev/null || true
    wait "${tracers[@]}" 2>/dev/null || true
    for side in server client; do
        echo "## $psys $side proxy: system calls per request ($requests requests)"
        awk -v n="$requests" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" {printf "%-16s %6.2f\n", $NF, $4 / n}' \
            "$work/strace-$side.txt" | sort -k2 -nr | head -"${SYSCALLS_TOP:-12}"
        echo
    done
    exit 0
fi
# start_perf RATE PID[,PID] FILE: `perf record` (call graphs) of those processes for DURATION + 1 s
# into $work/FILE, in the background (its pid appended to perf_pids). One file per process when
# each is reported alone: perf report's --pid/--tid filters keep or drop whole merged entries, so
# they do not split one recording by process. PERF_CALLGRAPH=dwarf unwinds through the Swift
# runtime's leaf functions (swift_retain and friends keep no frame pointer), at a higher cost.
perf_pids=()
start_perf() {
    perf record -F "$1" --call-graph "${PERF_CALLGRAPH:-fp}" -o "$work/$3" -p "$2" -- sleep "$((DURATION + 1))" 2>"$work/$3.log" &
    perf_pids+=($!)
    sleep 0.5
}
# PROFILE=ledger: both pairs loaded together as in the ledger phase (wrk -c64 each, DURATION
# seconds) under one `perf record` of the two inbound proxies; then, symbol by symbol, samples per
# 1,000 requests of each, and the difference: where the ledger pair's extra CPU per request goes.
if [ "${PROFILE:-}" = ledger ]; then
    [[ " ${systems[*]} " == *" sigil-noledger "* ]] || { echo "PROFILE=ledger needs both sigil pairs: $sigil_skip" >&2; exit 1; }
    command -v perf >/dev/null || { echo "PROFILE needs perf (apt-get install linux-perf)" >&2; exit 1; }
    log "perf record: the inbound proxies of sigil and sigil-noledger, both loaded for ${DURATION}s at 64 connections"
    start_perf 999 "${pair_server[sigil]},${pair_server[sigil-noledger]}" perf.data
    wrk -t1 -c64 -d"${DURATION}s" "${url[sigil]}" > "$work/profile-sigil.txt" 2>&1 &
    w1=$!
    wrk -t1 -c64 -d"${DURATION}s" "${url[sigil-noledger]}" > "$work/profile-sigil-noledger.txt" 2>&1 &
    w2=$!
    wait "$w1" "$w2" "${perf_pids[@]}" || true
    # One recording of both: split the samples by process from perf script.
    perf script -i "$work/perf.data" -F pid,tid,ip,sym 2>"$work/perf-script.log" > "$work/perf.script" || cat "$work/perf-script.log" >&2
    python3 - "$work" "${pair_server[sigil]}" "${pair_server[sigil-noledger]}" <<'PY'
import collections, re, sys
work, pids = sys.argv[1], {sys.argv[2]: "sigil", sys.argv[3]: "sigil-noledger"}
def requests(name):
    m = re.search(r"(\d+) requests in", open(f"{work}/profile-{name}.txt").read())
    return int(m.group(1)) if m else 0
leaf = {n: collections.Counter() for n in pids.values()}
inclusive = {n: collections.Counter() for n in pids.values()}
total = collections.Counter()
name, frames = None, []
def done():
    if name and frames:
        total[name] += 1
        leaf[name][frames[0]] += 1
        for f in set(frames):
            inclusive[name][f] += 1
for line in open(f"{work}/perf.script", errors="replace"):
    if line.strip() and not line.startswith("\t"):  # " PID/TID" heads a sample; its frames follow, tab-indented
        done()
        name, frames = pids.get(line.split("/")[0].strip()), []
    elif line.strip():
        parts = line.split(None, 1)
        frames.append(parts[1].strip()[:110] if len(parts) > 1 else "?")
done()
if not total:
    seen = collections.Counter(l.split("/")[0].strip() for l in open(f"{work}/perf.script", errors="replace") if l.strip() and not l.startswith("\t"))
    print(f"no samples of the inbound proxies (pids {', '.join(pids)}); perf script saw pids: {dict(seen)}")
r = {n: requests(n) for n in pids.values()}
per = lambda n, c: c * 1000 / max(1, r[n])
a, b = "sigil", "sigil-noledger"
print(f"requests: {a} {r[a]}, {b} {r[b]}")
print(f"inbound proxy samples per 1,000 requests: {a} {per(a, total[a]):.1f}, {b} {per(b, total[b]):.1f} "
      f"(×{per(a, total[a]) / max(1e-9, per(b, total[b])):.3f})")
def table(title, counters, top):
    print(title)
    keys = set(counters[a]) | set(counters[b])
    diff = sorted(keys, key=lambda k: per(a, counters[a][k]) - per(b, counters[b][k]), reverse=True)
    for k in diff[:top] + ["..."] + diff[-6:]:
        if k == "...":
            print("  ...")
            continue
        x, y = per(a, counters[a][k]), per(b, counters[b][k])
        print(f"  {x - y:+8.2f}  {x:8.2f} {y:8.2f}  {k}")
table("self samples per 1,000 requests by symbol (sigil − sigil-noledger, sigil, sigil-noledger):", leaf, 25)
table("inclusive samples per 1,000 requests, the ledger's own functions and their callers:",
      {n: collections.Counter({k: v for k, v in inclusive[n].items() if re.search(r"Ledger|ledger|writeNow|sha256", k)}) for n in pids.values()}, 15)
PY
    exit 0
fi
if [ -n "${PROFILE:-}" ]; then
    psys="${PROFILE_SYSTEM:-sigil}"  # or sigil-noledger
    [[ " ${systems[*]} " == *" $psys "* ]] || { echo "PROFILE needs the $psys pair: $sigil_skip" >&2; exit 1; }
    command -v perf >/dev/null || { echo "PROFILE needs perf (apt-get install linux-perf)" >&2; exit 1; }
    log "perf record: both $psys proxies, ${DURATION}s of ${PROFILE} at 64 connections"
    start_perf 499 "${pair_server[$psys]}" perf-server.data
    start_perf 499 "${pair_client[$psys]}" perf-client.data
    if [ "$PROFILE" = h2 ]; then
        h2load -t1 -c64 -m1 -D "$DURATION" "${h2url[$psys]}" | grep -E "^(finished|requests)" >&2
    elif [ "$PROFILE" = newconn ]; then
        wrk -t1 -c16 -d"${DURATION}s" -H "Connection: close" "${url[$psys]}" | grep -E "Requests/sec" >&2
    else
        wrk -t1 -c64 -d"${DURATION}s" "${url[$psys]}" | grep -E "Requests/sec" >&2
    fi
    wait "${perf_pids[@]}" || true
    for side in server client; do
        pid="${pair_server[$psys]}"; [ "$side" = client ] && pid="${pair_client[$psys]}"
        echo "## $psys $side proxy (pid $pid): self time, symbols ≥ 0.7 %"
        perf report -i "$work/perf-$side.data" --no-children --sort symbol --percent-limit 0.7 --stdio -g none 2>/dev/null \
            | grep -v '^#' | grep -v '^$' | cut -c1-160 | head -45
        echo
    done
    exit 0
fi

# A sigil system whose proxies are gone is skipped from then on (and says so once).
declare -A dead
usable() {
    local sys="$1"
    [ -n "${dead[$sys]:-}" ] && return 1
    case "$sys" in sigil*) ;; *) return 0 ;; esac
    if ! alive ${proxy_pids[$sys]}; then
        dead[$sys]=1
        [ "$sys" = sigil ] && sigil_skip="a sigil proxy exited during the runs ($2)"
        note "a $sys proxy exited ($2); no more $sys runs"
        tail -5 "$work"/sigil/proxy-"$sys"-*.log >&2 || true
        return 1
    fi
}
# rotated ROUND: the systems in an order that rotates per round (the machine's noise is ±15–25 %).
rotated() {
    local n=${#systems[@]} i
    for i in $(seq 0 $((n - 1))); do echo "${systems[$(((i + $1 - 1) % n))]}"; done
}
# side_ticks SYS: "outbound-proxy inbound-proxy backend" CPU ticks (0 0 for direct).
side_ticks() {
    local o=0 i=0
    if [ -n "${out_pids[$1]:-}" ]; then o="$(cpu_ticks ${out_pids[$1]})" || o=""; i="$(cpu_ticks ${in_pids[$1]})" || i=""; fi
    echo "$o $i $(cpu_ticks $backend_pids)"
}
# timed TSV SYS TAG OUTFILE -- COMMAND...: runs COMMAND, appends "SYS TAG out in backend OUTFILE" tick deltas.
timed() {
    local tsv="$1" sys="$2" tag="$3" out="$4"; shift 5
    local a b
    read -r -a a <<<"$(side_ticks "$sys")"
    "$@" > "$out" 2>&1 || true
    read -r -a b <<<"$(side_ticks "$sys")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$sys" "$tag" "$((b[0] - a[0]))" "$((b[1] - a[1]))" "$((b[2] - a[2]))" "$out" >> "$tsv"
}

if phase h1; then
log "HTTP/1.1 keep-alive (wrk): ${#systems[@]} systems × ${#CONNS[@]} connection counts × $ROUNDS rounds × ${DURATION}s"
for round in $(seq "$ROUNDS"); do
    for conns in "${CONNS[@]}"; do
        for sys in $(rotated "$round"); do
            usable "$sys" "h1 round $round" || continue
            measure "$sys" "$conns" "$round"
        done
    done
done
record_all_rss after
fi

if phase h2; then
log "HTTP/2 (h2load -m1): ${#systems[@]} systems × ${#CONNS[@]} connection counts × $H2_ROUNDS rounds × ${DURATION}s"
: > "$work/h2.tsv"
for round in $(seq "$H2_ROUNDS"); do
    for conns in "${CONNS[@]}"; do
        for sys in $(rotated "$round"); do
            usable "$sys" "h2 round $round" || continue
            timed "$work/h2.tsv" "$sys" "c$conns-r$round" "$work/runs/h2-$sys-c$conns-r$round.txt" -- \
                h2load -t1 -c"$conns" -m1 -D "$DURATION" --log-file "$work/runs/h2-$sys-c$conns-r$round.log" "${h2url[$sys]}"
            note "h2 round $round  $(printf '%-14s c=%-3s' "$sys" "$conns")  $(awk '/^finished in/ {print $4, "req/s"}' "$work/runs/h2-$sys-c$conns-r$round.txt")"
        done
    done
done
fi

if phase rate; then
log "latency at a fixed rate: h2load -c10 --rps 100 (1000 req/s) for ${RATE_DURATION}s, HTTP/1.1 and HTTP/2"
: > "$work/rate.tsv"
for proto in h1 h2; do
    for sys in $(rotated 1); do
        usable "$sys" "fixed rate $proto" || continue
        flags=(); target="${h2url[$sys]}"
        [ "$proto" = h1 ] && { flags=(--h1); target="${url[$sys]}"; }
        # Memory at 1k req/s is read 3 s before the end of the HTTP/1.1 run.
        sampler=""
        if [ "$proto" = h1 ] && [ "$sys" != direct ]; then
            ( sleep $((RATE_DURATION - 3)); record_sys_rss rate-1k "$sys" ) &
            sampler=$!
        fi
        timed "$work/rate.tsv" "$sys" "$proto" "$work/runs/rate-$proto-$sys.txt" -- \
            h2load -t1 -c10 --rps 100 -D "$RATE_DURATION" "${flags[@]}" --log-file "$work/runs/rate-$proto-$sys.log" "$target"
        [ -n "$sampler" ] && { wait "$sampler" 2>/dev/null || true; }
        note "fixed rate $proto $(printf '%-14s' "$sys") $(python3 -c '
import sys
t = sorted(int(l.split("\t")[2]) for l in open(sys.argv[1]) if l.strip())
print(f"{len(t)} requests, p50 {t[len(t)//2]} µs, p99 {t[int(len(t)*0.99)]} µs") if t else print("no requests")' "$work/runs/rate-$proto-$sys.log")"
    done
done
fi

if phase ledger && usable sigil "ledger pairs" && usable sigil-noledger "ledger pairs"; then
ledger_pin=0
if [ "${LEDGER_PIN:-0}" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then ledger_pin=1; fi
log "ledger cost: sigil and sigil-noledger loaded at the same time, $LEDGER_PAIRS runs × ${LEDGER_DURATION}s at 64 connections each$( ((ledger_pin)) && echo ", each pair's proxies pinned to a CPU of their own (swapped every run)")"
: > "$work/ledger.tsv"
for pair in $(seq "$LEDGER_PAIRS"); do
    # Both pairs under load at once share the same machine, second by second: the one that needs
    # more CPU per request completes fewer requests, and the machine's drift moves both alike.
    declare -A t0=()
    if ((ledger_pin)); then
        # Each pair's two proxies on a CPU of their own (swapped every run): neither pair's load
        # changes how the scheduler slices the other's, so the req/s ratio is the CPU-per-request ratio.
        mine=$((pair % 2))
        for p in ${proxy_pids[sigil]}; do taskset -a -p -c "$mine" "$p" >/dev/null; done
        for p in ${proxy_pids[sigil-noledger]}; do taskset -a -p -c "$((1 - mine))" "$p" >/dev/null; done
    fi
    for sys in sigil sigil-noledger; do t0[$sys]="$(cpu_ticks ${proxy_pids[$sys]})"; done
    wrk -t1 -c64 -d"${LEDGER_DURATION}s" "${url[sigil]}" > "$work/runs/ledger-sigil-$pair.txt" 2>&1 &
    w1=$!
    wrk -t1 -c64 -d"${LEDGER_DURATION}s" "${url[sigil-noledger]}" > "$work/runs/ledger-sigil-noledger-$pair.txt" 2>&1 &
    w2=$!
    wait "$w1" "$w2" || true
    line=""
    for sys in sigil sigil-noledger; do
        out="$work/runs/ledger-$sys-$pair.txt"
        p1="$(cpu_ticks ${proxy_pids[$sys]})" || p1=""
        printf '%s\t%s\t%s\t%s\n' "$pair" "$sys" "${p1:+$((p1 - t0[$sys]))}" "$out" >> "$work/ledger.tsv"
        line+="$(printf '%-14s %9s req/s   ' "$sys" "$(awk '/Requests\/sec/ {print $2}' "$out")")"
        bad="$(awk '/Non-2xx/ {print $5}' "$out")"
        [ -n "$bad" ] && line+="($bad non-2xx!)   "
    done
    note "ledger run $pair  $line"
done
if ((ledger_pin)); then  # the later phases run unpinned
    for p in ${proxy_pids[sigil]} ${proxy_pids[sigil-noledger]}; do taskset -a -p -c "0-$(($(nproc) - 1))" "$p" >/dev/null || true; done
fi
# What one row costs on its own (no load now): the floor beside the pairs' figure.
bench_bin="$(dirname "$SIGIL")/sigil-bench"
if [ -x "$bench_bin" ]; then
    (cd "$LEDGER_DIR" && "$bench_bin" ledger-row --count 100000) > "$work/ledger-row.txt" 2>&1 \
        && ledger_row="$(tr '\n' ' ' < "$work/ledger-row.txt")" && note "one ledger row on a quiet core: $ledger_row"
fi
fi

if phase newconn; then
log "new connections (wrk -c16, Connection: close): one full mTLS handshake between the proxies per request"
: > "$work/newconn.tsv"
for round in $(seq "$ROUNDS"); do
    for sys in nginx sigil; do
        [ -n "${ncurl[$sys]:-}" ] || continue
        usable "$sys" "new connections" || continue
        timed "$work/newconn.tsv" "$sys" "r$round" "$work/runs/newconn-$sys-r$round.txt" -- \
            wrk -t1 -c16 -d"${DURATION}s" -H "Connection: close" "${ncurl[$sys]}"
        note "new connections r$round $(printf '%-6s' "$sys") $(awk '/Requests\/sec/ {print $2, "conn/s"}' "$work/runs/newconn-$sys-r$round.txt")"
    done
done
fi

if phase conns; then
log "memory with $OPEN_CONNS open keep-alive connections (one request each, then held)"
for sys in "${systems[@]}"; do
    [ "$sys" = direct ] && continue
    usable "$sys" "open connections" || continue
    python3 "$repo/bench/hold_conns.py" "${url[$sys]}" "$OPEN_CONNS" "$work/hold-$sys.ready" > "$work/runs/hold-$sys.txt" 2>&1 &
    holder=$!
    for _ in $(seq 300); do [ -f "$work/hold-$sys.ready" ] && break; sleep 0.1; done
    sleep "${CONNS_SETTLE:-1}"  # CONNS_SETTLE: seconds to hold before reading (time to inspect the proxies)
    record_sys_rss "conns-$OPEN_CONNS" "$sys"
    kill "$holder" 2>/dev/null || true; wait "$holder" 2>/dev/null || true
    note "$sys: $(cat "$work/runs/hold-$sys.txt" | tail -1)"
done
fi

log "idle for ${IDLE_WAIT}s after the load"
sleep "$IDLE_WAIT"
record_all_rss idle-after

ledger_rows=""
for f in "$LEDGER_DIR"/ledger-*.jsonl; do
    [ -f "$f" ] && ledger_rows+="$(basename "$f")=$(wc -l < "$f") "
done

# ---------------------------------------------------------------------------------------------
# Summary: medians over rounds, a markdown table on stdout, everything in JSON.
# ---------------------------------------------------------------------------------------------
mkdir -p "$(dirname "$RESULT_JSON")"
export BENCH_WORK="$work" BENCH_JSON="$RESULT_JSON" BENCH_DURATION="$DURATION" BENCH_ROUNDS="$ROUNDS" \
    BENCH_WARMUP="$WARMUP" BENCH_SIGIL="$SIGIL" BENCH_SIGIL_BUILD="$sigil_build" BENCH_SIGIL_SKIP="$sigil_skip" \
    BENCH_SIGIL_MTIME="$(date -u -r "$SIGIL" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || true)" \
    BENCH_NGINX_VERSION="$("$NGINX" -v 2>&1 | sed 's/.*nginx\///')" \
    BENCH_WRK_VERSION="$(wrk -v 2>&1 | head -1 | awk '{print $2}')" \
    BENCH_OPENSSL="$(openssl version)" BENCH_CLK_TCK="$(getconf CLK_TCK)" \
    BENCH_ACCESS_LOG="$NGINX_ACCESS_LOG" BENCH_LEDGER_ROWS="$ledger_rows" BENCH_LEDGER_AA="${LEDGER_AA:-0}" BENCH_LEDGER_ROW="${ledger_row:-}" \
    BENCH_LOAD_BEFORE="$load_before" BENCH_BUSY_BEFORE="$busy_before" BENCH_LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)" \
    BENCH_COMMIT="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet HEAD -- Sources 2>/dev/null || echo -dirty)"
BENCH_RATE_DURATION="$RATE_DURATION" BENCH_H2_ROUNDS="$H2_ROUNDS" BENCH_OPEN_CONNS="$OPEN_CONNS" BENCH_PLOT="$PLOT" \
    "$(bench_python || true)" "$repo/bench/summarize_proxy.py" 2>/dev/null || python3 "$repo/bench/summarize_proxy.py"
