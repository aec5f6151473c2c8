#!/usr/bin/env bash
# Build the chained CNI plugin: cni/fsm-node-cni.c -> cni/build/fsm-node-cni
# (or $OUT). A static binary, so the DaemonSet can copy it onto any node's
# /opt/cni/bin whatever the host's libc. CC picks the compiler (the arm64
# proof cross-builds with CC=aarch64-linux-gnu-gcc).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cc="${CC:-gcc}"
out="${OUT:-$root/cni/build/fsm-node-cni}"
command -v "$cc" >/dev/null 2>&1 || { echo "build:cni: $cc not found: install the Debian package 'gcc'" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
src="$root/cni/fsm-node-cni.c"
if [ -x "$out" ] && [ "$out" -nt "$src" ] && [ "$out" -nt "$0" ] && [ -z "${CC:-}" ]; then exit 0; fi
"$cc" -O2 -Wall -Wextra -Werror -static -s -o "$out.tmp" "$src"
mv "$out.tmp" "$out"
echo "build:cni: $out"
