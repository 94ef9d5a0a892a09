#!/usr/bin/env bash
# Release build: both binaries, fully static for x86_64-unknown-linux-musl (OpenSSL compiled
# from source and linked in: the `vendored` feature), plus the host target; stripped; sizes
# printed. The release profile (Cargo.toml) is tuned for size: opt-level "z", LTO, one codegen
# unit, panic=abort, strip.
#
# Needs: musl-tools (x86_64-linux-musl-gcc) and `rustup target add x86_64-unknown-linux-musl`.
# The first (cold) build compiles OpenSSL: about 2-3 minutes on 2 cores.
#
# Usage: scripts/build-release.sh [--musl-only | --host-only]
# Output: target/x86_64-unknown-linux-musl/release/{hermeschat-pair,hermeschat-relay}
#         target/release/{hermeschat-pair,hermeschat-relay}     (under $CARGO_TARGET_DIR if set)
set -euo pipefail
cd "$(dirname "$0")/.."

MUSL=x86_64-unknown-linux-musl
TARGET_DIR=${CARGO_TARGET_DIR:-target}
BINS=(hermeschat-pair hermeschat-relay)
# Goal per binary (bytes): 7 MiB.
GOAL=$((7 * 1024 * 1024))

want_musl=1
want_host=1
case "${1:-}" in
  --musl-only) want_host=0 ;;
  --host-only) want_musl=0 ;;
  "") ;;
  *) echo "usage: $0 [--musl-only | --host-only]" >&2; exit 2 ;;
esac

if [ "$want_musl" = 1 ]; then
  if ! command -v x86_64-linux-musl-gcc >/dev/null && ! command -v musl-gcc >/dev/null; then
    echo "✗ musl-gcc not found: apt-get install -y musl-tools" >&2
    exit 2
  fi
  if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$MUSL"; then
    echo "✗ the $MUSL target is not installed: rustup target add $MUSL" >&2
    exit 2
  fi
fi

strip_bin() {
  # The profile already strips; this catches toolchains where it did not.
  if command -v strip >/dev/null; then strip "$1" 2>/dev/null || true; fi
}

report() {
  local path=$1 size
  size=$(stat -c %s "$path")
  local mib
  mib=$(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }')
  local verdict="✓"
  [ "$size" -le "$GOAL" ] || verdict="⚠ over the 7 MiB goal"
  printf '  %-62s %10d bytes  %6s MiB  %s\n' "$path" "$size" "$mib" "$verdict"
}

# The relay's SQLite is built without the extensions it never uses by LIBSQLITE3_FLAGS in
# .cargo/config.toml, which every build from this directory reads (set it yourself to override).

# The static binaries without unwind tables (panic=abort never unwinds; C code included) and
# with their relative relocations packed (DT_RELR): about 1.1 MiB less per binary, which pays
# for this crate's opt-level 3 (Cargo.toml). Packed relocations are applied by the musl
# start-up code Rust bundles, which reads them from musl 1.2.4 on (bundled since Rust 1.93);
# older toolchains get the unwind-table savings only. A RUSTFLAGS of your own replaces these.
musl_rustflags="-C force-unwind-tables=no"
rust_minor=$(rustc --version | sed -n 's/^rustc 1\.\([0-9]*\).*/\1/p')
if [ "${rust_minor:-0}" -ge 93 ]; then
  musl_rustflags="$musl_rustflags -C link-arg=-Wl,-z,pack-relative-relocs"
fi
export CFLAGS_x86_64_unknown_linux_musl="${CFLAGS_x86_64_unknown_linux_musl:--fno-asynchronous-unwind-tables -fno-unwind-tables}"
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="${CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS:-$musl_rustflags}"

t0=$(date +%s)
if [ "$want_musl" = 1 ]; then
  echo "== static build ($MUSL, vendored OpenSSL)"
  cargo build --locked --release --target "$MUSL" --features vendored --bins
fi
t1=$(date +%s)
if [ "$want_host" = 1 ]; then
  echo "== host build"
  cargo build --locked --release --bins
fi
t2=$(date +%s)

echo "== binaries"
for bin in "${BINS[@]}"; do
  if [ "$want_musl" = 1 ]; then
    strip_bin "$TARGET_DIR/$MUSL/release/$bin"
    report "$TARGET_DIR/$MUSL/release/$bin"
    # A start-up that cannot apply the packed relocations would crash here, not on a server.
    if ! env -i "$TARGET_DIR/$MUSL/release/$bin" --version >/dev/null; then
      echo "✗ $TARGET_DIR/$MUSL/release/$bin does not start" >&2
      exit 1
    fi
  fi
  if [ "$want_host" = 1 ]; then
    strip_bin "$TARGET_DIR/release/$bin"
    report "$TARGET_DIR/release/$bin"
  fi
done
echo "== build time: static $((t1 - t0)) s, host $((t2 - t1)) s"
