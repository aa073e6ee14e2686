# Shared by the bench/ scripts (sourced): installing the peers, building the release binaries once,
# and recording goals for bench/run.sh's summary.

# bench_install_peers: every outside tool the benchmarks drive, from Debian packages: nginx
# (nginx-light when the archive has it), wrk, h2load (nghttp2-client), hyperfine, openssl, curl,
# python3 with matplotlib (the plot), taskset (util-linux). Installs only what is missing.
bench_install_peers() {
    local missing=() sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    command -v wrk >/dev/null || missing+=(wrk)
    command -v h2load >/dev/null || missing+=(nghttp2-client)
    command -v hyperfine >/dev/null || missing+=(hyperfine)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v curl >/dev/null || missing+=(curl)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v python3 >/dev/null || missing+=(python3)
    [ -n "$(bench_python)" ] || missing+=(python3-matplotlib)
    if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then missing+=(NGINX); fi
    ((${#missing[@]})) || return 0
    echo "==> apt-get install (missing: ${missing[*]})" >&2
    $sudo apt-get update -qq
    if [[ " ${missing[*]} " == *" NGINX "* ]]; then
        local pkg=nginx
        # nginx-light has everything used here (ssl, http2, proxy, upstream keepalive, map) and less else.
        if apt-cache show nginx-light >/dev/null 2>&1 \
            && [ "$(apt-cache policy nginx-light 2>/dev/null | awk '/Candidate:/ {print $2}')" != "(none)" ]; then
            pkg=nginx-light
        fi
        missing=("${missing[@]/NGINX/$pkg}")
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# bench_python: a Python 3 that can import matplotlib (the python3 on PATH, else Debian's own
# /usr/bin/python3, where python3-matplotlib installs it); empty if neither can.
bench_python() {
    local py
    for py in python3 /usr/bin/python3; do
        if command -v "$py" >/dev/null && "$py" -c 'import matplotlib' 2>/dev/null; then command -v "$py"; return 0; fi
    done
}

# bench_build: the release binaries (sigil, sigil-bench), once per bench/run.sh (BENCH_BUILT=1 after).
bench_build() {
    [ "${BENCH_BUILT:-0}" = 1 ] && return 0
    export PATH="/opt/swift/usr/bin:$PATH"
    echo "==> swift build -c release (first time: several minutes)" >&2
    swift build -c release --static-swift-stdlib -Xlinker --gc-sections 2>&1 | grep -Ev "^\[[0-9]+/[0-9]+\]" >&2 || true
    [ -x .build/release/sigil ] && [ -x .build/release/sigil-bench ] \
        || { echo "release build failed (swift build -c release)" >&2; return 1; }
    export BENCH_BUILT=1
}

# bench_goals_json FILE NAME: reads "goal<TAB>measured<TAB>target<TAB>yes|NO|–" lines on stdin and
# writes them as {"benchmark": NAME, "goals": [...]} for bench/run.sh's summary.
bench_goals_json() {
    python3 -c '
import json, sys
goals = []
for line in sys.stdin:
    if line.strip():
        g, v, t, m = line.rstrip("\n").split("\t")
        goals.append({"goal": g, "text": v, "target": t, "met": {"yes": True, "NO": False}.get(m)})
json.dump({"benchmark": sys.argv[2], "goals": goals}, open(sys.argv[1], "w"), indent=1)
' "$1" "$2"
}
