#!/usr/bin/env bash
# mailtls beside stunnel4, HAProxy and nginx (mail module), in front of the same backend,
# each with one worker, the same ECDSA P-256 certificate, TLS 1.3 AES-128-GCM, the proxy
# pinned to core 0 and load generator + backend to core 1. Measures per proxy: CPU
# seconds (utime+stime of its processes, /proc/PID/stat) per GiB each way with 1 and 4
# streams, CPU seconds per 1,000 full handshakes, connect-to-greeting p50, and RSS per
# logged-in idle IMAP session with IDLE_SESSIONS open; plus `openssl speed` AES-128-GCM on
# one core as the physical limit. RUNS runs, medians, ratios against the best peer;
# written to benches/RESULTS.md.
#
# Usage: benches/compare.sh            (as root it installs the peers with apt-get)
#   RUNS=3 MIB=256 HANDSHAKES=1000 IDLE_SESSIONS=2000 benches/compare.sh   (about 5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
MIB=${MIB:-256}
HANDSHAKES=${HANDSHAKES:-1000}
IDLE_SESSIONS=${IDLE_SESSIONS:-2000}
PROXIES=${PROXIES:-"mailtls stunnel haproxy nginx"}
OUT=${OUT:-benches/RESULTS.md}
PROXY_CORE=0
LOAD_CORE=1

need=()
command -v stunnel4 >/dev/null || need+=(stunnel4)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_mail_module.so ] || need+=(libnginx-mod-mail)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "compare.sh: missing ${need[*]}; run as root to install them" >&2
        exit 1
    fi
fi
# nginx's package may have started a system nginx on port 80; ours uses its own ports.

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet --bin mailtls --example backend --example loadgen
BIN=target/release
W=$(mktemp -d /tmp/mailtls-compare.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${PROXY_PID:-}" ] && kill "$PROXY_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] && echo "kept $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT

BACKEND_PORT=${BACKEND_PORT:-38143}
AUTH_PORT=${AUTH_PORT:-38180}
PORT=${PORT:-38993}
for p in $BACKEND_PORT $AUTH_PORT $PORT; do
    if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then
        echo "compare.sh: port $p is in use by another program; set BACKEND_PORT/AUTH_PORT/PORT" >&2
        exit 1
    fi
done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
    -addext keyUsage=digitalSignature -addext extendedKeyUsage=serverAuth \
    -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null
cat "$W/cert.pem" "$W/key.pem" >"$W/combined.pem"

taskset -c $LOAD_CORE "$BIN/examples/backend" 127.0.0.1:$BACKEND_PORT 2>"$W/backend.log" &
PIDS+=($!)
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
        sleep 0.05
    done
    echo "compare.sh: nothing listens on port $1" >&2
    exit 1
}
wait_port $BACKEND_PORT
# nginx's mail proxy asks an HTTP endpoint where to send each login: always the backend.
cat >"$W/auth.py" <<EOF
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Auth-Status", "OK")
        self.send_header("Auth-Server", "127.0.0.1")
        self.send_header("Auth-Port", "$BACKEND_PORT")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", $AUTH_PORT), H).serve_forever()
EOF
taskset -c $LOAD_CORE python3 "$W/auth.py" &
PIDS+=($!)
wait_port $AUTH_PORT

cat >"$W/mailtls.toml" <<EOF
hostname = "bench.test"
# One load generator on one address opens every session: lift the per-address bound the
# way the peers have none.
[limits]
max_connections_per_address = 100000
[tls]
min_version = "1.3"
[[tls.certificates]]
cert = "$W/cert.pem"
key = "$W/key.pem"
[[listeners]]
name = "imaps"
protocol = "imap"
tls = "implicit"
listen = ["127.0.0.1:$PORT"]
backend = "127.0.0.1:$BACKEND_PORT"
EOF
cat >"$W/stunnel.conf" <<EOF
foreground = yes
pid =
debug = 3
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[imaps]
accept = 127.0.0.1:$PORT
connect = 127.0.0.1:$BACKEND_PORT
cert = $W/cert.pem
key = $W/key.pem
sslVersionMin = TLSv1.3
EOF
cat >"$W/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
frontend imaps
    bind 127.0.0.1:$PORT ssl crt $W/combined.pem ssl-min-ver TLSv1.3
    default_backend imap
backend imap
    server s1 127.0.0.1:$BACKEND_PORT
EOF
cat >"$W/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 16000;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 10000; }
mail {
    server_name bench.test;
    auth_http 127.0.0.1:$AUTH_PORT/auth;
    proxy on;
    ssl_certificate $W/cert.pem;
    ssl_certificate_key $W/key.pem;
    ssl_protocols TLSv1.3;
    server { listen 127.0.0.1:$PORT ssl; protocol imap; }
}
EOF

start_proxy() {
    case $1 in
    mailtls) RUST_LOG=warn taskset -c $PROXY_CORE "$BIN/mailtls" --config "$W/mailtls.toml" 2>>"$W/mailtls.log" & ;;
    stunnel) taskset -c $PROXY_CORE stunnel4 "$W/stunnel.conf" 2>>"$W/stunnel.log" & ;;
    haproxy) taskset -c $PROXY_CORE haproxy -db -f "$W/haproxy.cfg" 2>>"$W/haproxy.log" & ;;
    nginx) taskset -c $PROXY_CORE nginx -p "$W" -e "$W/nginx-error.log" -c "$W/nginx.conf" 2>>"$W/nginx.log" & ;;
    esac
    PROXY_PID=$!
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0
        sleep 0.05
    done
    echo "compare.sh: $1 did not start; see $W/$1.log" >&2
    cat "$W/$1.log" >&2 || true
    exit 1
}

stop_proxy() {
    kill "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=
    sleep 0.3
}

# The proxy's processes: the one started and its children (nginx's worker).
proxy_pids() {
    echo "$PROXY_PID"
    pgrep -P "$PROXY_PID" || true
}

# utime+stime of the proxy's processes, in clock ticks.
cpu_ticks() {
    local total=0 p
    for p in $(proxy_pids); do
        [ -r /proc/$p/stat ] || continue
        total=$((total + $(awk '{sub(/.*\) /, ""); print $12 + $13}' /proc/$p/stat)))
    done
    echo $total
}

rss_kib() {
    local total=0 p
    for p in $(proxy_pids); do
        [ -r /proc/$p/status ] || continue
        total=$((total + $(awk '/^VmRSS:/ {print $2}' /proc/$p/status)))
    done
    echo $total
}

TICK=$(getconf CLK_TCK)
RAW="$W/raw.tsv"
: >"$RAW"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"; }
LG() { taskset -c $LOAD_CORE "$BIN/examples/loadgen" "$@"; }

BYTES=$((MIB * 1024 * 1024))
for run in $(seq "$RUNS"); do
    for proxy in $PROXIES; do
        echo "run $run: $proxy" >&2
        start_proxy "$proxy"
        LG handshakes 127.0.0.1:$PORT "$W/cert.pem" 20 4 >/dev/null # warm-up
        for streams in 1 4; do
            for dir in up down; do
                c0=$(cpu_ticks)
                LG bulk 127.0.0.1:$PORT "$W/cert.pem" $dir $streams $BYTES >"$W/out"
                c1=$(cpu_ticks)
                record "$proxy" "cpu_per_gib_${dir}_${streams}" "$run" \
                    "$(echo "($c1 - $c0) / $TICK / ($MIB / 1024)" | bc -l)"
            done
        done
        c0=$(cpu_ticks)
        LG handshakes 127.0.0.1:$PORT "$W/cert.pem" "$HANDSHAKES" 8 >"$W/out"
        c1=$(cpu_ticks)
        record "$proxy" cpu_per_1000_handshakes "$run" "$(echo "($c1 - $c0) / $TICK * 1000 / $HANDSHAKES" | bc -l)"
        LG handshakes 127.0.0.1:$PORT "$W/cert.pem" 200 1 >"$W/out"
        record "$proxy" greeting_p50_ms "$run" "$(sed -n 's/.*greeting_p50_ms=\([0-9.]*\).*/\1/p' "$W/out")"
        r0=$(rss_kib)
        coproc IDLE { LG idle 127.0.0.1:$PORT "$W/cert.pem" "$IDLE_SESSIONS"; }
        read -r -t 120 ready <&"${IDLE[0]}" || ready=
        sleep 1
        r1=$(rss_kib)
        eval "exec ${IDLE[1]}>&-"
        wait "$IDLE_PID" 2>/dev/null || true
        if [ "${ready%% *}" = ready ]; then
            record "$proxy" rss_kib_per_idle_session "$run" "$(echo "($r1 - $r0) / $IDLE_SESSIONS" | bc -l)"
        else
            echo "compare.sh: $proxy: idle sessions did not all open" >&2
        fi
        stop_proxy
    done
done

# Physical limit: AES-128-GCM on one core, 16 KiB blocks (one TLS record), s/GiB.
AES=$(taskset -c $PROXY_CORE openssl speed -seconds 2 -evp aes-128-gcm 2>/dev/null |
    awk '/^AES-128-GCM|^aes-128-gcm/ {v=$NF; sub(/k$/, "", v); print 1024*1024*1024 / (v * 1000)}')

versions() {
    echo "- mailtls $(git rev-parse --short HEAD) ($(rustc --version))"
    echo "- $(stunnel4 -version 2>&1 | grep -m1 -i '^stunnel')"
    echo "- $(haproxy -v | head -1)"
    echo "- $(nginx -v 2>&1), libnginx-mod-mail $(dpkg-query -W -f='${Version}' libnginx-mod-mail 2>/dev/null)"
    echo "- $(openssl version); kernel $(uname -r); $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
}

python3 - "$RAW" "$OUT" "$AES" "$RUNS" "$MIB" "$HANDSHAKES" "$IDLE_SESSIONS" "$(versions)" <<'EOF'
import statistics, sys, datetime
raw, out, aes, runs, mib, hs, idle, versions = sys.argv[1:9]
data = {}
for line in open(raw):
    proxy, metric, run, value = line.rstrip("\n").split("\t")
    if value:
        data.setdefault(metric, {}).setdefault(proxy, []).append(float(value))
metrics = [
    ("cpu_per_gib_down_1", "CPU s/GiB server->client, 1 stream"),
    ("cpu_per_gib_up_1", "CPU s/GiB client->server, 1 stream"),
    ("cpu_per_gib_down_4", "CPU s/GiB server->client, 4 streams"),
    ("cpu_per_gib_up_4", "CPU s/GiB client->server, 4 streams"),
    ("cpu_per_1000_handshakes", "CPU s per 1,000 full handshakes"),
    ("greeting_p50_ms", "connect-to-greeting p50, ms"),
    ("rss_kib_per_idle_session", f"RSS KiB per logged-in idle session ({idle} open)"),
]
proxies = ["mailtls", "stunnel", "haproxy", "nginx"]
proxies = [p for p in proxies if any(p in data.get(m, {}) for m, _ in metrics)]
lines = [
    "# mailtls beside stunnel, HAProxy and nginx",
    "",
    f"Measured {datetime.date.today().isoformat()} by `benches/compare.sh` (RUNS={runs}, "
    f"MIB={mib} per transfer, HANDSHAKES={hs}, IDLE_SESSIONS={idle}). TLS 1.3, "
    "TLS_AES_128_GCM_SHA256, X25519, ECDSA P-256 certificate, no resumption; proxy pinned "
    "to core 0 with one worker, load generator and backend on core 1. Figures are medians "
    f"of {runs} runs; the ratio is mailtls against the best peer (lower is better, < 1 means "
    "mailtls is cheaper).",
    "",
    "| metric | " + " | ".join(proxies) + " | mailtls / best peer |",
    "|---|" + "---|" * (len(proxies) + 1),
]
for key, label in metrics:
    row = data.get(key, {})
    med = {p: statistics.median(row[p]) for p in proxies if p in row}
    cells = [f"{med[p]:.3f}" if p in med else "-" for p in proxies]
    peers = [v for p, v in med.items() if p != "mailtls"]
    ratio = f"{med['mailtls'] / min(peers):.2f}" if "mailtls" in med and peers and min(peers) > 0 else "-"
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
lines += [
    "",
    f"Physical limit: `openssl speed -evp aes-128-gcm` on one core costs {float(aes):.3f} CPU s/GiB "
    "(16 KiB blocks) — the encryption alone, without any socket work." if aes else
    "Physical limit: `openssl speed` gave no figure.",
    "",
    "Versions:",
    "",
    versions,
    "",
    "Raw figures, every run (proxy, metric, run, value):",
    "",
    "```",
]
lines += [l.rstrip("\n") for l in open(raw)]
lines += ["```", ""]
open(out, "w").write("\n".join(lines))
print("\n".join(lines[:len(metrics) + 10]))
EOF
