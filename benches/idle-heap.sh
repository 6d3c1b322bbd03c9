#!/usr/bin/env bash
# Where an idle logged-in IMAP TLS session's memory goes: opens IDLE_SESSIONS sessions
# through mailtls (the same config, backend and load generator as benches/compare.sh) and
# reports RSS per session; with HEAPTRACK=1 it runs mailtls under heaptrack and splits the
# live heap at its peak (all sessions open, nothing else going on) by owner, so RSS per
# session can be split into live heap by owner and allocator overhead (RSS minus heap).
#
# Usage: benches/idle-heap.sh                       IDLE_SESSIONS=2000 (RSS only, seconds)
#        HEAPTRACK=1 benches/idle-heap.sh           (live heap by owner; needs heaptrack)
#        MAILTLS_ENV="MALLOC_ARENA_MAX=1" benches/idle-heap.sh   (environment for mailtls)
#        NOBUILD=1 ...                              (use target/release as it is)
#        MAILTLS_BIN=/tmp/mailtls-base ...          (another mailtls binary, for A/B)
#        CPU=1 ...                                  (first: mailtls's CPU seconds per GiB
#                                                    each way, BULK_MIB per transfer, and per
#                                                    1,000 full handshakes, HANDSHAKES)
# heaptrack's own bookkeeping lives in the same process, so under HEAPTRACK=1 the RSS
# figure is inflated: quote RSS from a run without it, the heap split from one with it.
set -euo pipefail
cd "$(dirname "$0")/.."

IDLE_SESSIONS=${IDLE_SESSIONS:-2000}
BACKEND_PORT=${BACKEND_PORT:-39143}
PORT=${PORT:-39993}
MAILTLS_ENV=${MAILTLS_ENV:-}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ -n "${NOBUILD:-}" ] || cargo build --release --quiet --bin mailtls --example backend --example loadgen
BIN=target/release
MAILTLS_BIN=${MAILTLS_BIN:-$BIN/mailtls}
BULK_MIB=${BULK_MIB:-512}
HANDSHAKES=${HANDSHAKES:-1000}
W=$(mktemp -d /tmp/mailtls-idleheap.XXXXXX)
PIDS=()
cleanup() {
    [ -n "${IDLE_PID:-}" ] && kill "$IDLE_PID" 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "kept $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 200); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "idle-heap.sh: nothing listens on port $1" >&2
    exit 1
}

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
    -addext keyUsage=digitalSignature -addext extendedKeyUsage=serverAuth \
    -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null
cat >"$W/mailtls.toml" <<CONF
hostname = "bench.test"
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
CONF

taskset -c 1 "$BIN/examples/backend" 127.0.0.1:$BACKEND_PORT 2>"$W/backend.log" &
PIDS+=($!)
wait_port $BACKEND_PORT
# shellcheck disable=SC2086 # MAILTLS_ENV is a list of NAME=VALUE words
if [ -n "${HEAPTRACK:-}" ]; then
    env $MAILTLS_ENV RUST_LOG=warn taskset -c 0 heaptrack -o "$W/heap" "$MAILTLS_BIN" --config "$W/mailtls.toml" \
        >"$W/heaptrack.log" 2>&1 &
else
    env $MAILTLS_ENV RUST_LOG=warn taskset -c 0 "$MAILTLS_BIN" --config "$W/mailtls.toml" 2>"$W/mailtls.log" &
fi
LAUNCH=$!
PIDS+=($LAUNCH)
wait_port $PORT
# The process whose RSS counts: mailtls itself (env and taskset exec it; heaptrack's shell
# script runs it as a child).
MPID=$LAUNCH
if [ -n "${HEAPTRACK:-}" ]; then
    name=$(basename "$MAILTLS_BIN" | cut -c1-15)
    for p in $(pgrep -P "$LAUNCH"); do
        [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$name" ] && MPID=$p
    done
fi
rss() { awk '/^VmRSS:/ {print $2}' /proc/"$MPID"/status; }
cpu_ticks() { awk '{sub(/.*\) /, ""); print $12 + $13}' /proc/"$MPID"/stat; }
LG() { taskset -c 1 "$BIN/examples/loadgen" "$@"; }
TICK=$(getconf CLK_TCK)
# Warm-up, as compare.sh does before it measures.
LG handshakes 127.0.0.1:$PORT "$W/cert.pem" 20 4 >/dev/null
if [ -n "${CPU:-}" ]; then
    for dir in up down; do
        c0=$(cpu_ticks)
        LG bulk 127.0.0.1:$PORT "$W/cert.pem" $dir 1 $((BULK_MIB * 1024 * 1024)) >/dev/null
        c1=$(cpu_ticks)
        printf 'cpu_s_per_gib_%s=%s ' $dir "$(echo "scale=3; ($c1 - $c0) / $TICK / ($BULK_MIB / 1024)" | bc -l)"
    done
    c0=$(cpu_ticks)
    LG handshakes 127.0.0.1:$PORT "$W/cert.pem" "$HANDSHAKES" 8 >/dev/null
    c1=$(cpu_ticks)
    printf 'cpu_s_per_1000_handshakes=%s\n' "$(echo "scale=3; ($c1 - $c0) / $TICK * 1000 / $HANDSHAKES" | bc -l)"
fi
sleep 0.5
r0=$(rss)
c0=$(cpu_ticks)
coproc IDLE { LG idle 127.0.0.1:$PORT "$W/cert.pem" "$IDLE_SESSIONS"; }
read -r -t 300 ready <&"${IDLE[0]}" || ready=
sleep 1
r1=$(rss)
c1=$(cpu_ticks)
[ "${ready%% *}" = ready ] || { echo "idle-heap.sh: sessions did not all open" >&2; exit 1; }
printf 'sessions=%s rss_before_kib=%s rss_after_kib=%s rss_kib_per_session=%s cpu_s_per_1000_logins=%s\n' \
    "$IDLE_SESSIONS" "$r0" "$r1" "$(echo "scale=2; ($r1 - $r0) / $IDLE_SESSIONS" | bc -l)" \
    "$(echo "scale=3; ($c1 - $c0) / $TICK * 1000 / $IDLE_SESSIONS" | bc -l)"
[ -n "${HEAPTRACK:-}" ] || exit 0

# The heap's peak is now (every session open, the last handshake's scratch at most on top).
# Stop mailtls, let the sessions go, and let heaptrack write its file.
kill -TERM "$MPID"
eval "exec ${IDLE[1]}>&-"
wait "$LAUNCH" 2>/dev/null || true
f=$(ls "$W"/heap*.zst "$W"/heap*.gz 2>/dev/null | head -1 || true)
heaptrack_print -f "$f" -p 1 -a 0 -T 0 -l 0 -n 40 -s 3 -F "$W/stacks.txt" --flamegraph-cost-type peak \
    >"$W/peaks.txt" 2>&1 || true
cp "$W/peaks.txt" "${PEAKS_OUT:-/tmp/idle-heap-peaks.txt}"
cp "$f" "${HEAP_OUT:-/tmp/idle-heap.zst}" 2>/dev/null || true
grep -E '^(peak heap memory consumption|peak RSS)' "$W/peaks.txt" || tail -5 "$W/peaks.txt"
python3 - "$W/stacks.txt" "$IDLE_SESSIONS" <<'PY'
import re, sys
# Each stack's peak bytes go to the innermost frame whose own path names an owner; frames of
# the standard library and of container crates belong to their caller. Symbols come either
# demangled ("rustls::conn::...", "<A as B>::f" spelled _$LT$A$u20$as$u20$B$GT$) or in
# Rust's v0 mangling (`Cs<hash>_<len><crate>` then the module names, root first).
V0 = re.compile(r"Cs[0-9A-Za-z]*_(\d+)")
def v0_path(frame):
    m = V0.search(frame)
    if not m:
        return None
    parts, i = [], m.start(1)
    while i < len(frame) and frame[i].isdigit() and len(parts) < 3:
        j = i
        while frame[j].isdigit():
            j += 1
        n = int(frame[i:j])
        parts.append(frame[j:j + n])
        i = j + n
    return parts
def legacy_path(frame):
    f = frame.split(" (")[0].replace("$LT$", "<").replace("$GT$", ">").replace("$u20$", " ").replace("..", "::")
    f = f.lstrip("_")
    m = re.match(r"<(.+?) as ([a-z_0-9]+(?:::[A-Za-z_0-9]+)*)", f)
    if m:
        inner, trait = m.group(1), m.group(2)
        f = trait if trait.startswith("mailtls") else inner
    parts = re.split(r"::|<", f)
    return [p for p in parts[:3] if p]
def owner(frame):
    if "aws_lc_0" in frame or re.match(r"(OPENSSL|EVP|EC|BN|CRYPTO)_", frame):
        return "aws-lc (keys, crypto state)"
    p = v0_path(frame) if frame.startswith("_R") else legacy_path(frame)
    if not p:
        return None
    crate, sub, sub2 = (p + ["", "", ""])[:3]
    if crate in ("rustls", "tokio_rustls"):
        return "rustls connection (state, buffers)"
    if crate == "aws_lc_rs":
        return "aws-lc (keys, crypto state)"
    if crate == "tokio":
        if sub == "runtime" and sub2 == "task":
            return "tokio task cell (its future)"
        if "time" in (sub, sub2):
            return "tokio timers"
        if sub in ("net", "io") or sub2 in ("io", "driver"):
            return "tokio I/O registration"
        return "tokio other"
    if crate == "mailtls":
        return {"relay": "mailtls relay (engine futures, record layer)",
                "session": "mailtls session (phase futures)",
                "protocol": "mailtls protocol state", "backend": "mailtls backend connect",
                "tls": "mailtls tls (stream wrapper, key log)",
                "server": "mailtls server (accept, connection future)"}.get(sub, "mailtls " + sub)
    if crate in ("alloc", "core", "std", "hashbrown", "bytes", "") or crate.startswith("{"):
        return None
    return crate
# heaptrack lists a physical frame's inlined callees in an order of their own, so the owner
# of an allocation is not simply the innermost named frame. Instead: among the frames since
# the task was last polled (the allocation's own call chain), the most specific owner.
PRIORITY = ["rustls connection (state, buffers)", "aws-lc (keys, crypto state)",
            "tokio task cell (its future)", "tokio I/O registration", "tokio timers",
            "mailtls relay (engine futures, record layer)", "mailtls tls (stream wrapper, key log)",
            "mailtls protocol state", "mailtls backend connect", "mailtls session (phase futures)",
            "mailtls server (accept, connection future)"]
def task_poll(frame):
    f = frame.replace("..", "::")
    return "task" in f and "Core" in f and "poll" in f
totals = {}
for line in open(sys.argv[1]):
    stack, _, cost = line.rstrip("\n").rpartition(" ")
    if not cost.isdigit():
        continue
    frames = stack.split(";")
    start = max((i for i, f in enumerate(frames) if task_poll(f)), default=-1) + 1
    found = [o for o in (owner(f) for f in frames[start:]) if o]
    ranked = [o for o in PRIORITY if o in found]
    name = ranked[0] if ranked else (found[-1] if found else "other")
    totals[name] = totals.get(name, 0) + int(cost)
n = int(sys.argv[2])
total = sum(totals.values())
print(f"live heap at its peak: {total / 1024:.0f} KiB, {total / n:.0f} bytes per session")
rest = 0
for name, b in sorted(totals.items(), key=lambda kv: -kv[1]):
    if b / n >= 8:
        print(f"  {name:46s} {b / n:8.0f} bytes/session")
    else:
        rest += b
print(f"  {'the rest (each < 8 bytes/session)':46s} {rest / n:8.0f} bytes/session")
PY
echo "peaks: ${PEAKS_OUT:-/tmp/idle-heap-peaks.txt}"
