#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need when it can (root with
# apt-get), then runs formatting and lint checks and every test, the interop tests included
# (real Postfix, Dovecot and mail clients; see tests/interop.rs).
#   tests/run.sh            # from the crate root
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools the tests drive. openssl: TLS posture and s_client checks. systemd:
# systemd-socket-activate (socket activation tests) and systemd-analyze (unit verification
# and the security exposure threshold); no running systemd is needed. The rest: the interop
# tests' servers (postfix, dovecot-*) and real clients; bsdutils gives `script`, which the
# Postfix fixture uses to see why a start failed. The package tests (tests/package.rs,
# tests/contrib.rs): dpkg-dev and lintian build and check the .deb, man-db renders the man
# pages with warnings on, prometheus ships promtool for the alert rules. podman, runc,
# catatonit (the pods' pause process), netavark and debootstrap: the container image, the
# sidecar pod and systemd as PID 1 (tests/container_*.rs; base images are made from Debian's
# packages once and kept under their tags). python3-yaml: the Kubernetes manifest check.
# haproxy: the balancer of tests/fleet.rs. iptables: netavark (podman's default network, the
# pods' published ports) runs it, and podman only suggests it. The backend matrix
# (tests/interop_exim.rs, interop_opensmtpd.rs, interop_cyrus.rs, interop_courier.rs) runs
# each of those servers in a container whose image is the runtime base plus the server's
# Debian packages (tests/common/podman.rs, DerivedImage): the base is debootstrapped once,
# each server's image built on it once, and both kept under their tags for later runs.
# strace: tests/cli.rs checks that a failed run's error leaves in one write.
packages=(openssl systemd postfix dovecot-imapd dovecot-pop3d swaks msmtp fetchmail isync sslscan curl python3 bsdutils
  dpkg-dev lintian man-db prometheus podman runc catatonit netavark debootstrap python3-yaml haproxy iptables strace)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tests/run.sh: installing ${missing[*]}"
    apt-get update -qq
    # Postfix's and msmtp's package questions take their defaults; nothing is started
    # (no init system in CI: "invoke-rc.d ... denied" is expected).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    missing=()
  else
    echo "tests/run.sh: missing packages: ${missing[*]} (run as root to install them)" >&2
  fi
fi

# cargo-deb builds the Debian package (tests/package.rs); compiling it takes about three
# minutes on two cores, once per machine. The .deb is made from the debug binary the tests
# build anyway (packaging/build-deb.sh --debug), so CI never compiles a release build.
if ! command -v cargo-deb >/dev/null; then
  echo "tests/run.sh: installing cargo-deb"
  cargo install --quiet --locked cargo-deb --version 3.8.0 \
    || echo "tests/run.sh: cargo-deb did not install; the package test will print SKIPPED" >&2
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The interop tests start Postfix and Dovecot from private directories, which takes root
# and the packages above; they are #[ignore]d so that plain `cargo test` works anywhere.
# So are the container tests (podman as root). As root with podman they must work: they
# fail, never skip; elsewhere they print SKIPPED, except under CI=true, where they fail.
# Criterion's bench binaries take no libtest flags; `cargo test` runs them once, quickly.
# The examples (benchmark backend and load generator) have no tests: clippy built them.
cargo test --benches
ignored=()
if [ "$(id -u)" = 0 ] && [ ${#missing[@]} -eq 0 ]; then
  ignored=(--include-ignored)
else
  echo "tests/run.sh: NOT running the interop tests (they need root and: ${packages[*]})" >&2
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --lib --bins --tests -- "${ignored[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One plain total over every test binary, as the last line.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests/run.sh: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
