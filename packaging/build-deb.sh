#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (`cargo install cargo-deb --locked`) and prints
# its path (target/debian/mailtls_<version>-1_<arch>.deb).
#   packaging/build-deb.sh           # from a release build: the package to ship
#   packaging/build-deb.sh --debug   # packages target/debug/mailtls as it is, without a
#                                    # second, release build (what the tests and CI use:
#                                    # same files, same scripts, a slower binary)
# Generated files (man pages, completions, the units with ExecStart at /usr/bin) go to
# target/package/, which Cargo.toml's [package.metadata.deb] names: the service in
# systemd/, the socket units in sockets/ (each has its own systemd-units entry).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=release
case "${1:-}" in
  --debug) mode=debug ;;
  "") ;;
  *) echo "usage: $0 [--debug]" >&2; exit 2 ;;
esac
command -v cargo-deb >/dev/null || { echo "$0: cargo-deb is missing: cargo install cargo-deb --locked" >&2; exit 1; }

stage=target/package
rm -rf "$stage"
mkdir -p "$stage/systemd" "$stage/sockets"
cargo run --quiet --example manpages -- "$stage"
# The project's units install /usr/local/bin/mailtls by hand; the package's binary is in /usr/bin.
for unit in systemd/*.service systemd/*.socket; do
  case "$unit" in *.socket) dir=sockets ;; *) dir=systemd ;; esac
  { echo "# Installed by the mailtls Debian package; change it with a drop-in (systemctl edit $(basename "$unit"))."
    sed 's#/usr/local/bin/mailtls#/usr/bin/mailtls#g' "$unit"; } > "$stage/$dir/$(basename "$unit")"
done
if grep -v '^#' "$stage"/systemd/* "$stage"/sockets/* | grep -q /usr/local; then
  echo "$0: a unit setting still names /usr/local" >&2; exit 1
fi

if [ "$mode" = release ]; then
  cargo deb --strip -- --locked >&2
  deb=$(ls -t target/debian/mailtls_*.deb | head -n 1)
else
  cargo build --quiet --bin mailtls
  # cargo-deb packages "target/release/mailtls" from the target directory it is given:
  # a private one holding the debug binary, so no real release build is ever overwritten.
  fake="$stage/cargo-target"
  mkdir -p "$fake/release"
  cp target/debug/mailtls "$fake/release/mailtls"
  CARGO_TARGET_DIR="$fake" cargo deb --no-build --strip --output target/debian/ >&2
  deb=$(ls -t target/debian/mailtls_*.deb | head -n 1)
fi
echo "$deb"
