#!/usr/bin/env bash
# Proves the ktls relay engine on a real kernel with the TLS ULP: boots Debian's stock
# kernel (linux-image-amd64, CONFIG_TLS=m) in qemu with a tiny initramfs holding busybox,
# the tls module and its crypto modules, and the relay test binary built statically, and
# runs the kernel-TLS tests inside. The build machine's own kernel has no CONFIG_TLS, so
# without this the ktls engine never runs anywhere.
#
#   tests/ktls-qemu.sh                     # from the crate root, as root on Debian 12
#   KTLS_QEMU_TESTS="ktls" tests/ktls-qemu.sh          # libtest filters (space-separated)
#   KTLS_QEMU_TIMEOUT=900 KTLS_QEMU_KEEP=1 tests/ktls-qemu.sh
#
# KVM is used when /dev/kvm works; where it opens but the guest cannot boot (nested KVM on
# this project's build machine hangs in early boot), TCG emulation takes over: about 2.5
# minutes in all here. It downloads a kernel package (about 70 MB) and boots a VM, so it
# is NOT part of tests/run.sh or CI. The kernel is only unpacked into a temporary directory, never
# installed on the host. Exits 0 only if the kernel-TLS tests really ran in the guest (not
# SKIPPED) and passed.
set -euo pipefail
cd "$(dirname "$0")/.."

timeout_s=${KTLS_QEMU_TIMEOUT:-900}
# The ktls tests, plus the end-to-end test whose IMAPS session must log engine=ktls.
tests=${KTLS_QEMU_TESTS:-"ktls the_engine_of_each_session_is_logged_and_counted"}
# Extra arguments for the guest's test binary (e.g. --ignored for the CPU measurement).
extra=${KTLS_QEMU_ARGS:-}
say() { echo "ktls-qemu: $*" >&2; }

# ---- tools -------------------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "missing packages: ${need[*]} (run as root on Debian to install them)"
    exit 2
  fi
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# busybox-static replaces the dynamic busybox at /bin/busybox; either way it must be static
# to run alone in the initramfs.
busybox=/bin/busybox
if command -v file >/dev/null && ! file -L "$busybox" | grep -q 'statically linked'; then
  say "$busybox is not statically linked (install busybox-static)"
  exit 2
fi

work=$(mktemp -d /tmp/ktls-qemu.XXXXXX)
# apt-get download drops privileges to _apt, which must be able to write here.
chmod 755 "$work"
cleanup() {
  if [ -n "${KTLS_QEMU_KEEP:-}" ]; then say "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# ---- kernel ------------------------------------------------------------------------------
# linux-image-amd64 is a metapackage: its Depends names the versioned image package.
mkdir -p "$work/deb" && chmod 777 "$work/deb"
(cd "$work/deb" && apt-get download -qq linux-image-amd64)
image=$(dpkg-deb -f "$work"/deb/linux-image-amd64_*.deb Depends | grep -o 'linux-image-[0-9][^ ,|]*' | head -n1)
[ -n "$image" ] || { say "cannot tell the kernel image package from linux-image-amd64"; exit 1; }
say "kernel package: $image"
(cd "$work/deb" && apt-get download -qq "$image")
dpkg-deb -x "$work"/deb/"$image"_*.deb "$work/kernel"
rm -rf "$work/deb"
kver=$(ls "$work/kernel/lib/modules" | head -n1)
vmlinuz="$work/kernel/boot/vmlinuz-$kver"
grep -qx 'CONFIG_TLS=[my]' "$work/kernel/boot/config-$kver" || { say "$kver has no CONFIG_TLS"; exit 1; }
say "kernel $kver: $(grep -E '^CONFIG_TLS=' "$work/kernel/boot/config-$kver")"

# ---- test binary -------------------------------------------------------------------------
# Static (crt-static with glibc is fine: the tests do no DNS) so it runs alone in the
# initramfs; a separate target dir so the normal build is not invalidated by RUSTFLAGS.
say "building the relay test binary statically"
bin=$(RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/ktls-qemu \
  cargo test --test relay --no-run --target x86_64-unknown-linux-gnu --message-format=json \
  | grep -o '"executable":"[^"]*"' | tail -n1 | sed 's/^"executable":"//; s/"$//')
[ -x "$bin" ] || { say "no test executable built"; exit 1; }

# ---- initramfs ---------------------------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,proc,sys,dev,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
for applet in sh mount ip insmod poweroff uname cat echo sleep mkdir; do
  ln -s busybox "$root/bin/$applet"
done
objcopy --strip-debug "$bin" "$root/bin/relay-tests" 2>/dev/null || cp "$bin" "$root/bin/relay-tests"

# Modules: tls itself, and the AEADs it asks the crypto API for (gcm(aes), ccm(aes),
# rfc7539(chacha20,poly1305)) with their fast x86 implementations, loaded up front because
# the guest has no modprobe for the kernel to call. Dependencies come from each module's
# own .modinfo "depends=" (the package ships no modules.dep: depmod makes it at install).
moddir="$work/kernel/lib/modules/$kver/kernel"
wanted=(tls gf128mul ghash-generic ghash-clmulni-intel cryptd crypto_simd aesni-intel gcm ccm
  libchacha chacha_generic chacha-x86_64 poly1305_generic poly1305-x86_64 libpoly1305
  libchacha20poly1305 chacha20poly1305)
declare -A path_of=() loaded=()
while IFS= read -r ko; do
  name=$(basename "$ko" .ko)
  path_of[$name]=$ko
  path_of[${name//-/_}]=$ko
done < <(find "$moddir" -name '*.ko')
order=()
add_module() {
  local name=$1 ko deps d
  ko=${path_of[$name]:-${path_of[${name//-/_}]:-}}
  # Not a module: built in (modules.builtin) or absent; the guest's dmesg tells which.
  [ -n "$ko" ] || return 0
  [ -z "${loaded[$ko]:-}" ] || return 0
  loaded[$ko]=1
  deps=$(tr '\0' '\n' <"$ko" | grep -a '^depends=' | head -n1 | cut -d= -f2 || true)
  for d in ${deps//,/ }; do add_module "$d"; done
  order+=("$ko")
}
for m in "${wanted[@]}"; do add_module "$m"; done
: >"$root/modules"
for ko in "${order[@]}"; do
  cp "$ko" "$root/lib/modules/"
  echo "$(basename "$ko")" >>"$root/modules"
done
say "modules: $(tr '\n' ' ' <"$root/modules")"

cat >"$root/init" <<EOF
#!/bin/sh
export PATH=/bin HOME=/tmp TMPDIR=/tmp RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ip link set lo up
for m in \$(cat /modules); do
  insmod /lib/modules/\$m 2>/dev/null || echo "KTLS-QEMU: insmod \$m failed (built in?)"
done
echo "KTLS-QEMU: kernel \$(uname -r), tls module: \$(grep -c '^tls ' /proc/modules) loaded, cpus: \$(grep -c ^processor /proc/cpuinfo)"
echo "KTLS-QEMU: running relay-tests $tests $extra --nocapture --test-threads=1"
cd /tmp
/bin/relay-tests $tests $extra --nocapture --test-threads=1
rc=\$?
echo "KTLS-QEMU: exit code \$rc"
if [ \$rc = 0 ]; then echo "KTLS-QEMU: PASS"; else echo "KTLS-QEMU: FAIL"; fi
poweroff -f
EOF
chmod 755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.cpio.gz"
say "initramfs: $(du -h "$work/initramfs.cpio.gz" | cut -f1)"

# ---- boot --------------------------------------------------------------------------------
log="$work/serial.log"
# Runs the VM with the given accelerator arguments, streaming its serial console. Returns
# qemu's status, 124 when the whole run timed out, or 125 when the guest had not reached
# its init script within the boot allowance (a KVM that opens but cannot run the guest).
run_vm() {
  local boot_allowance=$1 started=$SECONDS qpid tpid
  shift
  : >"$log"
  qemu-system-x86_64 "$@" -smp 2 -m 1024 -nic none \
    -kernel "$vmlinuz" -initrd "$work/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet" -nographic -no-reboot </dev/null >"$log" 2>&1 &
  qpid=$!
  tail -n +1 -f --pid="$qpid" "$log" | tr -d '\r' &
  tpid=$!
  while kill -0 "$qpid" 2>/dev/null; do
    if ((SECONDS - started > timeout_s)); then
      kill "$qpid"; wait "$qpid" 2>/dev/null; wait "$tpid" 2>/dev/null; return 124
    fi
    if ((boot_allowance > 0 && SECONDS - started > boot_allowance)) && ! grep -q '^KTLS-QEMU: kernel' "$log"; then
      kill "$qpid"; wait "$qpid" 2>/dev/null; wait "$tpid" 2>/dev/null; return 125
    fi
    sleep 1
  done
  local rc=0
  wait "$qpid" || rc=$?
  wait "$tpid" 2>/dev/null || true
  return "$rc"
}

qemu_rc=0
accel="TCG"
# KVM when /dev/kvm opens. arch-capabilities is masked because nested KVM (this build
# machine is itself a VM) refuses that MSR and qemu aborts. Some nested set-ups still hang
# in early boot, so a guest that has not reached its init script within the allowance is
# retried with TCG: much slower to boot, but the same real kernel.
if (exec 3<>/dev/kvm) 2>/dev/null; then
  accel="KVM"
  say "booting with KVM (timeout ${timeout_s}s)"
  run_vm "${KTLS_QEMU_BOOT_ALLOWANCE:-60}" -enable-kvm -cpu host,-arch-capabilities || qemu_rc=$?
  if [ "$qemu_rc" = 125 ] || [ "$qemu_rc" = 134 ]; then
    say "the KVM guest did not boot (status $qemu_rc); retrying with TCG"
    accel="TCG"
    qemu_rc=0
  fi
fi
if [ "$accel" = TCG ]; then
  say "booting with TCG emulation (timeout ${timeout_s}s)"
  run_vm 0 -accel tcg -cpu max || qemu_rc=$?
fi
tr -d '\r' <"$log" >"$log.txt"
if [ -n "${KTLS_QEMU_LOG:-}" ]; then cp "$log.txt" "$KTLS_QEMU_LOG"; fi

# ---- verdict -----------------------------------------------------------------------------
fail() { say "FAIL: $*"; exit 1; }
[ "$qemu_rc" = 124 ] && fail "the VM did not finish within ${timeout_s}s"
grep -q '^KTLS-QEMU: PASS' "$log.txt" || fail "the tests failed in the guest (or never ran): $(grep '^KTLS-QEMU: exit code' "$log.txt" || echo 'no exit code')"
grep -q 'SKIPPED' "$log.txt" && fail "a kernel-TLS test was SKIPPED in the guest"
grep -q '^test result: ok\.' "$log.txt" || fail "no passing libtest summary in the guest output"
# The ktls tests print "ktls proof: ..." only after asserting engine=ktls and TCP_ULP=tls.
grep -q 'ktls proof: TLS1.3 AES-128-GCM' "$log.txt" || fail "the 64 MiB kernel-TLS test did not prove the kernel path"
proofs=$(grep -c 'ktls proof:' "$log.txt" || true)
passed=$(grep -o '^test result: ok\. [0-9]* passed' "$log.txt" | grep -o '[0-9]* passed' | head -n1)
say "PASS: $passed in the guest, $proofs kernel-TLS proofs, on $kver ($accel)"; grep -o 'ktls proof:.*' "$log.txt" >&2
