#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need when it can (root with
# apt-get), then runs formatting and lint checks and every test.
#   tests/run.sh            # from the crate root
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools the tests drive as real clients. openssl: TLS posture and s_client checks.
# systemd: systemd-socket-activate (socket activation tests) and systemd-analyze (unit
# verification and the security exposure threshold); no running systemd is needed.
packages=(openssl systemd)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tests/run.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "tests/run.sh: missing packages: ${missing[*]} (run as root to install them)" >&2
  fi
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
