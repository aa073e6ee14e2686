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
# - wrk -t1 at 1 and 64 connections, DURATION seconds per run, ROUNDS rounds; in every round each
#   system runs once per connection count, the order of systems rotating between rounds (the
#   machine's noise is ±15–25 %, so only medians of interleaved rounds rank anything). A WARMUP run
#   per system at 64 connections fills the connection pools first and is not counted.
# - CPU: utime+stime of the proxy processes (/proc/PID/stat; nginx: master and worker of both
#   proxies; sigil: both proxy processes, all threads) read before and after each wrk run, divided
#   by the requests wrk completed → µs of proxy CPU per request. The backend's is recorded too.
# - "added p99" is the median over rounds of (system p99 − direct p99 in the same round).
# - RSS: VmRSS (and RssAnon, the process's private anonymous memory) of each proxy process idle
#   (IDLE_WAIT seconds without traffic after the set-up requests), at the end of the last run, idle
#   again IDLE_WAIT seconds after it, and VmHWM (peak). The sigil proxy gives back pages it mapped
#   for a burst once it has been idle ~10-20 s; nginx has no such step.
# - Everything listens on 127.0.0.1 on free ports; every process started here is stopped on exit.
#
#   bash bench/proxy.sh                       # defaults: DURATION=10 ROUNDS=3 WARMUP=2 (~3-4 min)
#   SIGIL=/path/to/sigil ROUNDS=5 bash bench/proxy.sh
#   KEEP=1 bash bench/proxy.sh                # keep the temp dir (configs, logs, raw wrk output)
#
# Prints a markdown table; writes bench/results/proxy-<UTC date>.json (raw runs + summary).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
WARMUP="${WARMUP:-2}"
IDLE_WAIT="${IDLE_WAIT:-25}"
NGINX_ACCESS_LOG="${NGINX_ACCESS_LOG:-0}"
CONNS=(1 64)
RESULT_JSON="${RESULT_JSON:-$repo/bench/results/proxy-$(date -u +%Y-%m-%d).json}"

log() { echo "==> $*" >&2; }
note() { echo "    $*" >&2; }

# ---------------------------------------------------------------------------------------------
# Peers: nginx (nginx-light if the archive has it), wrk, h2load (nghttp2-client, for HTTP/2 later),
# openssl, curl, python3. Installs only what is missing.
# ---------------------------------------------------------------------------------------------
install_peers() {
    local missing=() sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    command -v wrk >/dev/null || missing+=(wrk)
    command -v h2load >/dev/null || missing+=(nghttp2-client)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then missing+=(NGINX); fi
    ((${#missing[@]})) || return 0
    log "apt-get install (missing: ${missing[*]})"
    $sudo apt-get update -qq
    if [[ " ${missing[*]} " == *" NGINX "* ]]; then
        local pkg=nginx
        # nginx-light has everything used here (ssl, proxy, upstream keepalive, map) and less else.
        if [ "$(apt-cache policy nginx-light 2>/dev/null | awk '/Candidate:/ {print $2}')" != "(none)" ] \
            && apt-cache show nginx-light >/dev/null 2>&1; then pkg=nginx-light; fi
        missing=("${missing[@]/NGINX/$pkg}")
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

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
        ssl_session_cache shared:bench_in:1m;
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
    d="$work/nginx-out"; mkdir -p "$d"
    { nginx_head "$d" "$(access_log_line "$d/access.log")"; cat <<EOF
    upstream inbound {
        server 127.0.0.1:$port_nginx_in;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }
    server {
        listen 127.0.0.1:$port_nginx_out backlog=4096;
        location / {
            proxy_pass https://inbound;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate $pki/client.pem;
            proxy_ssl_certificate_key $pki/client.key;
            proxy_ssl_trusted_certificate $pki/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name server.bench.local;
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

    local ledger_in=() ledger_out=()
    if ((sigil_ledger)); then
        ledger_in=(--ledger "$d/ledger-server.jsonl"); ledger_out=(--ledger "$d/ledger-client.jsonl")
    else
        note "'sigil proxy run' has no --ledger option: running without one"
    fi
    # server side: mTLS STRICT inbound on port_sigil_in → backend, policy applies (app=server)
    "$SIGIL" proxy run --workload-api "unix://$d/agent.sock" --spiffe-id "spiffe://$td/ns/bench/sa/server" \
        --inbound "127.0.0.1:$port_sigil_in" --app "127.0.0.1:$port_backend" \
        --namespace bench --labels app=server --policies "$d/policies" --mtls STRICT \
        "${ledger_in[@]}" "${proxy_extra[@]}" >"$d/proxy-server.log" 2>&1 &
    sigil_server_pid=$!
    started+=($!)
    # client side: outbound on port_sigil_out → mTLS to the server proxy, which must be .../sa/server
    "$SIGIL" proxy run --workload-api "unix://$d/agent.sock" --spiffe-id "spiffe://$td/ns/bench/sa/client" \
        --inbound "127.0.0.1:$port_sigil_in2" --app "127.0.0.1:$port_backend" \
        --namespace bench --labels app=client --policies "$d/policies" \
        --outbound "127.0.0.1:$port_sigil_out" --upstream "127.0.0.1:$port_sigil_in" \
        --upstream-id "spiffe://$td/ns/bench/sa/server" \
        "${ledger_out[@]}" "${proxy_extra[@]}" >"$d/proxy-client.log" 2>&1 &
    sigil_client_pid=$!
    started+=($!)
    # Up to 60 s for both proxies to fetch their SVIDs and answer through the pair; stop early if one exits.
    local deadline=$((SECONDS + 60)) up=0
    while ((SECONDS < deadline)); do
        if curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$port_sigil_out/"; then up=1; break; fi
        alive "$sigil_server_pid" "$sigil_client_pid" || break
        sleep 0.2
    done
    if ((!up)); then
        if alive "$sigil_server_pid" "$sigil_client_pid"; then
            sigil_skip="the sigil pair did not answer 200 within 60 s (last try: $(curl -sS -o /dev/null --max-time 5 \
                -w 'HTTP %{http_code}' "http://127.0.0.1:$port_sigil_out/" 2>&1 | tr '\n' ' ' || true))"
        else
            sigil_skip="a sigil proxy exited at startup: $(cat "$d/proxy-server.log" "$d/proxy-client.log" | grep -v '^\s*$' | tail -1)"
        fi
        note "server proxy log: $(tail -3 "$d/proxy-server.log" | tr '\n' ' ')"
        note "client proxy log: $(tail -3 "$d/proxy-client.log" | tr '\n' ' ')"
        return 1
    fi
    local body
    body="$(curl -sf --max-time 5 "http://127.0.0.1:$port_sigil_out/" || true)"
    [ "$body" = "hello" ] || { sigil_skip="the sigil pair answered '$body', not the backend's 'hello'"; return 1; }
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
    for sys in "${systems[@]}"; do
        case "$sys" in
        nginx)
            record_rss "$1" nginx "outbound master" "${nginx_master[nginx-out]}"
            for w in ${nginx_workers[nginx-out]}; do record_rss "$1" nginx "outbound worker" "$w"; done
            record_rss "$1" nginx "inbound master" "${nginx_master[nginx-in]}"
            for w in ${nginx_workers[nginx-in]}; do record_rss "$1" nginx "inbound worker" "$w"; done ;;
        sigil)
            record_rss "$1" sigil "client proxy" "$sigil_client_pid"
            record_rss "$1" sigil "server proxy" "$sigil_server_pid" ;;
        esac
    done
}

# measure SYSTEM CONNS ROUND: one wrk run; raw output kept, CPU deltas appended to runs.tsv.
measure() {
    local sys="$1" conns="$2" round="$3" out="$work/runs/$1-c$2-r$3.txt"
    local p0 p1 b0 b1
    p0="$(cpu_ticks ${proxy_pids[$sys]})"; b0="$(cpu_ticks $backend_pids)"
    wrk -t1 -c"$conns" -d"${DURATION}s" --latency "${url[$sys]}" > "$out" 2>&1 || true
    # A proxy that died during the run leaves its CPU figure empty (and the run shows errors).
    p1="$(cpu_ticks ${proxy_pids[$sys]})" || p1=""; b1="$(cpu_ticks $backend_pids)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$sys" "$conns" "${p1:+$((p1 - p0))}" "$((b1 - b0))" "$out" >> "$work/runs.tsv"
    note "round $round  $(printf '%-6s c=%-3s' "$sys" "$conns")  $(awk '/Requests\/sec/ {r=$2} $1=="99%" {p=$2} END {printf "%s req/s  p99 %s", r, p}' "$out")"
}

# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
install_peers
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# Which sigil: $SIGIL, else the release build if there is one, else the debug build.
sigil_build="unknown"
if [ -z "${SIGIL:-}" ]; then
    if [ -x .build/release/sigil ]; then
        SIGIL="$repo/.build/release/sigil"
        if [ -x .build/debug/sigil ] && [ .build/debug/sigil -nt .build/release/sigil ]; then
            note "note: .build/debug/sigil is newer than .build/release/sigil; the release build may be stale"
            note "      (swift build -c release --product sigil)"
        fi
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
chmod 755 "$work"
mkdir -p "$work/runs"
: > "$work/runs.tsv"; : > "$work/rss.tsv"

read -r port_backend port_nginx_in port_nginx_out port_sigil_server port_sigil_in port_sigil_in2 port_sigil_out \
    <<<"$(free_ports 7)"

log "test PKI (root → intermediate → P-256 leaves with SPIFFE URI SANs)"
make_pki "$work/pki"
log "backend nginx on 127.0.0.1:$port_backend"
setup_backend
backend_pids="${nginx_master[backend]} ${nginx_workers[backend]}"
systems=(direct)
url[direct]="http://127.0.0.1:$port_backend/"
proxy_pids[direct]=""

log "nginx pair: 127.0.0.1:$port_nginx_out → mTLS → 127.0.0.1:$port_nginx_in → backend"
setup_nginx_pair
systems+=(nginx)
url[nginx]="http://127.0.0.1:$port_nginx_out/"
proxy_pids[nginx]="${nginx_master[nginx-out]} ${nginx_workers[nginx-out]} ${nginx_master[nginx-in]} ${nginx_workers[nginx-in]}"

sigil_skip=""; sigil_ledger=0; sigil_server_pid=""; sigil_client_pid=""; proxy_extra=()
log "sigil pair ($SIGIL, $sigil_build build)"
if sigil_available && setup_sigil_pair; then
    systems+=(sigil)
    url[sigil]="http://127.0.0.1:$port_sigil_out/"
    proxy_pids[sigil]="$sigil_server_pid $sigil_client_pid"
    note "127.0.0.1:$port_sigil_out → mTLS → 127.0.0.1:$port_sigil_in → backend"
    case "$sigil_build" in
    debug) note "WARNING: a debug build of sigil: its figures mean nothing (swift build -c release --product sigil)" ;;
    unknown) note "note: cannot tell from its path whether $SIGIL is a release build" ;;
    esac
else
    note "SKIPPED: $sigil_skip"
fi

log "idle for ${IDLE_WAIT}s before the first memory reading"
sleep "$IDLE_WAIT"
record_all_rss idle
log "warm-up: ${WARMUP}s at 64 connections per system (not counted)"
for sys in "${systems[@]}"; do wrk -t1 -c64 -d"${WARMUP}s" "${url[$sys]}" >/dev/null 2>&1 || true; done

log "measuring: ${#systems[@]} systems × ${#CONNS[@]} connection counts × $ROUNDS rounds × ${DURATION}s"
sigil_dead=0
for round in $(seq "$ROUNDS"); do
    for conns in "${CONNS[@]}"; do
        n=${#systems[@]}
        order=()
        for i in $(seq 0 $((n - 1))); do order+=("${systems[$(((i + round - 1) % n))]}"); done  # rotates per round
        for sys in "${order[@]}"; do
            if [ "$sys" = sigil ] && { ((sigil_dead)) || ! alive $sigil_server_pid $sigil_client_pid; }; then
                if ((!sigil_dead)); then
                    sigil_dead=1
                    sigil_skip="a sigil proxy exited during the runs (round $round)"
                    note "a sigil proxy exited; no more sigil runs"
                    tail -5 "$work/sigil/proxy-server.log" "$work/sigil/proxy-client.log" >&2 || true
                fi
                continue
            fi
            measure "$sys" "$conns" "$round"
        done
    done
done
record_all_rss after
log "idle for ${IDLE_WAIT}s after the load"
sleep "$IDLE_WAIT"
record_all_rss idle-after

ledger_rows=""
for f in "$work"/sigil/ledger-*.jsonl; do
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
    BENCH_ACCESS_LOG="$NGINX_ACCESS_LOG" BENCH_LEDGER_ROWS="$ledger_rows" \
    BENCH_LOAD_BEFORE="$load_before" BENCH_BUSY_BEFORE="$busy_before" BENCH_LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)" \
    BENCH_COMMIT="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet HEAD -- Sources 2>/dev/null || echo -dirty)"
python3 - <<'PY'
import json, os, platform, re, statistics, datetime

env = os.environ
clk = int(env["BENCH_CLK_TCK"])
UNIT = {"us": 1.0, "ms": 1e3, "s": 1e6}

def parse_wrk(text):
    def lat(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        return float(m.group(1)) * UNIT[m.group(2)] if m else None
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": int(total.group(1)) if total else 0,
        "p50_us": lat(50), "p75_us": lat(75), "p90_us": lat(90), "p99_us": lat(99),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, sock.groups())) if sock else 0,
    }

runs = []
with open(os.path.join(env["BENCH_WORK"], "runs.tsv")) as f:
    for line in f:
        rnd, system, conns, pt, bt, path = line.rstrip("\n").split("\t")
        r = {"round": int(rnd), "system": system, "conns": int(conns)}
        r.update(parse_wrk(open(path).read()))
        req = max(r["requests"], 1)
        r["proxy_cpu_s"] = int(pt) / clk if pt and system != "direct" else None
        r["backend_cpu_s"] = int(bt) / clk
        r["proxy_cpu_us_per_req"] = int(pt) / clk * 1e6 / req if pt and system != "direct" else None
        r["backend_cpu_us_per_req"] = int(bt) / clk * 1e6 / req
        runs.append(r)

rss = []
with open(os.path.join(env["BENCH_WORK"], "rss.tsv")) as f:
    for line in f:
        phase, system, label, pid, kb, hwm, anon = line.rstrip("\n").split("\t")
        rss.append({"phase": phase, "system": system, "process": label, "pid": int(pid),
                    "vmrss_kb": int(kb or 0), "vmhwm_kb": int(hwm or 0), "rssanon_kb": int(anon or 0)})

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

systems = [s for s in ("direct", "nginx", "sigil") if any(r["system"] == s for r in runs)]
conns_list = sorted({r["conns"] for r in runs})
summary = {}
for c in conns_list:
    direct = {r["round"]: r for r in runs if r["system"] == "direct" and r["conns"] == c}
    for s in systems:
        rs = [r for r in runs if r["system"] == s and r["conns"] == c]
        if not rs:
            continue
        added = [r["p99_us"] - direct[r["round"]]["p99_us"] for r in rs
                 if r["round"] in direct and r["p99_us"] is not None and direct[r["round"]]["p99_us"] is not None]
        summary[f"{s}/c{c}"] = {
            "system": s, "conns": c, "rounds": len(rs),
            "rps_median": med(r["rps"] for r in rs),
            "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs),
            "p50_us_median": med(r["p50_us"] for r in rs),
            "p99_us_median": med(r["p99_us"] for r in rs),
            "added_p99_us_median": med(added) if s != "direct" else None,
            "proxy_cpu_us_per_req_median": med(r["proxy_cpu_us_per_req"] for r in rs),
            "backend_cpu_us_per_req_median": med(r["backend_cpu_us_per_req"] for r in rs),
            "errors": sum(r["non_2xx"] + r["socket_errors"] for r in rs),
        }

def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None

ratios = {}
for c in conns_list:
    sg, ng = summary.get(f"sigil/c{c}"), summary.get(f"nginx/c{c}")
    if sg and ng:
        ratios[f"c{c}"] = {
            "rps": ratio(sg["rps_median"], ng["rps_median"]),
            "added_p99": ratio(sg["added_p99_us_median"], ng["added_p99_us_median"]),
            "proxy_cpu_per_req": ratio(sg["proxy_cpu_us_per_req_median"], ng["proxy_cpu_us_per_req_median"]),
        }

def lat(us):
    if us is None: return "–"
    return f"{us:.0f} µs" if us < 1000 else f"{us/1000:.2f} ms"

def num(x, fmt="{:,.0f}"):
    return "–" if x is None else fmt.format(x)

print()
print(f"sidecar pair benchmark: wrk -t1, {env['BENCH_DURATION']} s per run, medians of "
      f"{env['BENCH_ROUNDS']} interleaved rounds, {os.cpu_count()} CPUs, nginx {env['BENCH_NGINX_VERSION']}, "
      f"sigil {env['BENCH_SIGIL_BUILD']} build")
print()
print("| system | conns | req/s median (min–max) | p50 | p99 | added p99 vs direct | proxy CPU µs/req |")
print("|---|---:|---:|---:|---:|---:|---:|")
for c in conns_list:
    for s in systems:
        x = summary.get(f"{s}/c{c}")
        if not x: continue
        flag = " ⚠" if x["errors"] else ""
        print(f"| {s}{flag} | {c} | {num(x['rps_median'])} ({num(x['rps_min'])}–{num(x['rps_max'])}) "
              f"| {lat(x['p50_us_median'])} | {lat(x['p99_us_median'])} "
              f"| {lat(x['added_p99_us_median']) if s != 'direct' else '–'} "
              f"| {num(x['proxy_cpu_us_per_req_median'])} |")
print()
for c, rt in ratios.items():
    print(f"sigil / nginx at {c[1:]} conn(s): req/s ×{num(rt['rps'], '{:.2f}')}, "
          f"added p99 ×{num(rt['added_p99'], '{:.2f}')}, proxy CPU per request ×{num(rt['proxy_cpu_per_req'], '{:.2f}')}")
if int(env["BENCH_BUSY_BEFORE"]) > 15:
    print(f"WARNING: the CPUs were {env['BENCH_BUSY_BEFORE']}% busy before the run started: figures are low and noisy")
if env["BENCH_SIGIL_SKIP"]:
    print(f"sigil pair skipped: {env['BENCH_SIGIL_SKIP']}")
elif env["BENCH_SIGIL_BUILD"] == "debug":
    print(f"WARNING: sigil is a debug build ({env['BENCH_SIGIL']}): its figures mean nothing")
elif env["BENCH_SIGIL_BUILD"] != "release":
    print(f"note: cannot tell whether {env['BENCH_SIGIL']} is a release build")
for k, x in summary.items():
    if x["errors"]:
        print(f"⚠ {k}: {x['errors']} non-2xx responses or socket errors (see the JSON's runs)")

if rss:
    print()
    print("| process | idle VmRSS (anon) | end of load VmRSS (anon) | idle after load VmRSS (anon) | peak VmHWM |")
    print("|---|---:|---:|---:|---:|")
    keys = []
    for r in rss:
        if (r["system"], r["process"], r["pid"]) not in keys:
            keys.append((r["system"], r["process"], r["pid"]))
    mb = lambda kb: f"{kb/1024:.1f} MB" if kb else "–"
    def cell(phase, pid):
        r = next((r for r in rss if r["phase"] == phase and r["pid"] == pid), None)
        return f"{mb(r['vmrss_kb'])} ({mb(r['rssanon_kb'])})" if r else "–"
    for sysname, label, pid in keys:
        last = [r for r in rss if r["pid"] == pid]
        peak = max((r["vmhwm_kb"] for r in last), default=0)
        print(f"| {sysname} {label} | {cell('idle', pid)} | {cell('after', pid)} | {cell('idle-after', pid)} | {mb(peak)} |")
if env["BENCH_LEDGER_ROWS"].strip():
    print(f"\nledger rows written: {env['BENCH_LEDGER_ROWS'].strip()}")

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
                 "warmup_s": int(env["BENCH_WARMUP"]), "wrk_threads": 1, "conns": conns_list,
                 "nginx_access_log": env["BENCH_ACCESS_LOG"] == "1"},
    "versions": {"nginx": env["BENCH_NGINX_VERSION"], "wrk": env["BENCH_WRK_VERSION"],
                 "openssl": env["BENCH_OPENSSL"]},
    "sigil": {"binary": env["BENCH_SIGIL"], "build": env["BENCH_SIGIL_BUILD"],
              "binary_mtime": env["BENCH_SIGIL_MTIME"] or None,
              "skipped": env["BENCH_SIGIL_SKIP"] or None,
              "ledger_rows": env["BENCH_LEDGER_ROWS"].strip() or None},
    "method": "medians over interleaved rounds; added p99 = median of per-round (system p99 - direct p99); "
              "proxy CPU = utime+stime of both proxies' processes during the run / requests",
    "summary": summary, "ratios_sigil_over_nginx": ratios, "rss": rss, "runs": runs,
}
with open(env["BENCH_JSON"], "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
print(f"\nJSON: {env['BENCH_JSON']}")
PY
