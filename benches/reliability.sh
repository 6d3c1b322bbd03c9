#!/usr/bin/env bash
# Reliability figures at full size (issue 7): tests/reliability.rs with
# MAILTLS_RELIABILITY_SCALE=full against the release binary (idle load of 10,000 TLS IMAP
# sessions or as many as the descriptor limit allows, 1,000-session integrity soak, faults,
# SIGTERM under load, slowloris, floods, random and oversized input), then the protocol
# fuzzers: the proptest targets with a large budget and, where cargo-fuzz runs, each
# libFuzzer target (protocol state machines, config and routes parsers) for FUZZ_SECONDS,
# and testssl.sh over every port (benches/testssl.sh). Prints the figures, writes them to
# OUT. Never run in CI: tests/run.sh does not call it.
#
# Usage: benches/reliability.sh                       (about 30 minutes on 2 cores)
#   FUZZ_SECONDS=300 PROPTEST_CASES=100000 benches/reliability.sh
# Every step runs under `timeout`; all traffic stays on 127.0.0.x.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benches/RELIABILITY-RESULTS.md}
FUZZ_SECONDS=${FUZZ_SECONDS:-120}
PROPTEST_CASES=${PROPTEST_CASES:-30000}
W=$(mktemp -d /tmp/mailtls-reliability.XXXXXX)
trap 'rm -rf "$W"' EXIT

# Each idle session costs the proxy two descriptors; take all the hard limit allows.
ulimit -n "$(ulimit -Hn)"
echo "reliability.sh: building the release binary" >&2
cargo build --release --quiet --bin mailtls
cargo test --release --quiet --test reliability --test protocol_fuzz --no-run 2>/dev/null

started=$(date -u +%Y-%m-%dT%H:%MZ)
{
    echo "# Reliability figures"
    echo
    echo "Produced by \`benches/reliability.sh\` on $started."
    echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r), $(rustc --version)."
    echo "Descriptor limit (ulimit -n, soft = hard): $(ulimit -n)."
    echo
} >"$W/out.md"

echo "reliability.sh: tests/reliability.rs at full size (up to 30 minutes)" >&2
report="$W/report.txt"
: >"$report"
t0=$(date +%s)
status=0
timeout 1800 env MAILTLS_RELIABILITY_SCALE=full MAILTLS_BIN="$PWD/target/release/mailtls" \
    MAILTLS_RELIABILITY_REPORT="$report" \
    cargo test --release --quiet --test reliability -- --test-threads=1 >"$W/reliability.log" 2>&1 || status=$?
t1=$(date +%s)
{
    echo "## tests/reliability.rs, full size"
    echo
    echo '```'
    echo "MAILTLS_RELIABILITY_SCALE=full MAILTLS_BIN=target/release/mailtls cargo test --release --test reliability -- --test-threads=1"
    echo "# exit status $status, $((t1 - t0)) s"
    cat "$report"
    grep -E "^test result" "$W/reliability.log" || true
    echo '```'
    echo
} >>"$W/out.md"
if [ "$status" != 0 ]; then
    grep -E "panicked|FAILED" "$W/reliability.log" | head -20 >&2 || true
fi

echo "reliability.sh: proptest targets, $PROPTEST_CASES cases each" >&2
t0=$(date +%s)
pstatus=0
timeout 1800 env PROPTEST_CASES="$PROPTEST_CASES" cargo test --release --quiet --test protocol_fuzz \
    >"$W/proptest.log" 2>&1 || pstatus=$?
t1=$(date +%s)
{
    echo "## Property-based fuzzing (tests/protocol_fuzz.rs)"
    echo
    echo '```'
    echo "PROPTEST_CASES=$PROPTEST_CASES cargo test --release --test protocol_fuzz"
    echo "# exit status $pstatus, $((t1 - t0)) s; 7 targets x $PROPTEST_CASES cases"
    grep -E "^test result|Test failed|minimal failing" "$W/proptest.log" || true
    echo '```'
    echo
} >>"$W/out.md"

echo "reliability.sh: cargo-fuzz targets, $FUZZ_SECONDS s each" >&2
{
    echo "## cargo-fuzz (fuzz/), libFuzzer with AddressSanitizer"
    echo
    echo '```'
} >>"$W/out.md"
if command -v cargo-fuzz >/dev/null; then
    # The protocol state machines, and the parsers of the files mailtls reads (issue 15).
    for target in pre_tls negotiation config routes; do
        fstatus=0
        RUSTC_BOOTSTRAP=1 timeout $((FUZZ_SECONDS + 600)) cargo fuzz run "$target" -- \
            -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=1 \
            >"$W/fuzz-$target.log" 2>&1 || fstatus=$?
        runs=$(grep -E "^stat::number_of_executed_units" "$W/fuzz-$target.log" | awk '{print $2}' | tail -1)
        cov=$(grep -oE "cov: [0-9]+" "$W/fuzz-$target.log" | tail -1)
        crash=$(grep -cE "^==[0-9]+==ERROR|panicked at|deadly signal" "$W/fuzz-$target.log" || true)
        echo "RUSTC_BOOTSTRAP=1 cargo fuzz run $target -- -max_total_time=$FUZZ_SECONDS: exit $fstatus, executions ${runs:-?}, ${cov:-cov: ?}, crashes $crash" >>"$W/out.md"
    done
else
    echo "cargo-fuzz not installed (cargo install cargo-fuzz); skipped" >>"$W/out.md"
fi
echo '```' >>"$W/out.md"

# TLS posture per testssl.sh over all seven port roles (issue 15; about 1.5 minutes each).
echo "reliability.sh: testssl.sh over every port of the example config" >&2
tstatus=0
if command -v testssl >/dev/null; then
    MAILTLS_BIN="$PWD/target/release/mailtls" timeout 3600 benches/testssl.sh >>"$W/out.md" || tstatus=$?
else
    echo "testssl.sh not installed (apt-get install testssl.sh); skipped" >>"$W/out.md"
fi

cp "$W/out.md" "$OUT"
cat "$OUT"
[ "$status" = 0 ] && [ "$pstatus" = 0 ] && [ "$tstatus" = 0 ]
