#!/usr/bin/env bash
# Compile the kernel programs: bpf/*.bpf.c -> bpf/build/<name>.o and the test
# fixtures test/fixtures/bpf/*.bpf.c -> bpf/build/fixtures/<name>.o.
#
# The programs use only UAPI contexts (bpf_sock_addr, bpf_sock_ops, sk_msg_md,
# bpf_sockopt, __sk_buff), no vmlinux.h and no PT_REGS, so one object built
# here serves x86_64 and arm64 and nothing is compiled on a node at run time.
# Objects newer than their source and every header are skipped.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/bpf/build"
clang="${CLANG:-clang}"

die() { echo "build:bpf: $*" >&2; exit 1; }

command -v "$clang" >/dev/null 2>&1 || die "clang not found: install the Debian package 'clang' (apt-get install clang)"

# The host's multiarch directory holds asm/types.h, which linux/bpf.h includes.
triplet="$(gcc -print-multiarch 2>/dev/null || true)"
[ -n "$triplet" ] || triplet="$("$clang" -print-multiarch 2>/dev/null || true)"
[ -n "$triplet" ] || triplet="$(uname -m)-linux-gnu"
sysinc="/usr/include/$triplet"

[ -f /usr/include/bpf/bpf_helpers.h ] || die "bpf/bpf_helpers.h not found: install the Debian package 'libbpf-dev'"
[ -f /usr/include/linux/bpf.h ] || die "linux/bpf.h not found: install the Debian package 'linux-libc-dev'"
if [ ! -f "$sysinc/asm/types.h" ] && [ ! -f /usr/include/asm/types.h ]; then
  die "asm/types.h not found (looked in $sysinc and /usr/include): install 'linux-libc-dev' (or 'gcc-multilib' for the /usr/include/asm link)"
fi

cflags=(-O2 -g -target bpf -Wall -Werror -Wno-unused-function
  -I "$root/bpf/include" -I "$sysinc" -idirafter /usr/include)

# Newest header mtime: an object older than any header is rebuilt.
newest_header=0
for h in "$root"/bpf/include/*.h "$root"/test/fixtures/bpf/*.h; do
  [ -e "$h" ] || continue
  t=$(stat -c %Y "$h"); [ "$t" -gt "$newest_header" ] && newest_header=$t
done

failed=0 built=0 skipped=0
compile() { # src dst
  local src=$1 dst=$2
  if [ -e "$dst" ]; then
    local to; to=$(stat -c %Y "$dst")
    if [ "$to" -ge "$(stat -c %Y "$src")" ] && [ "$to" -ge "$newest_header" ]; then
      skipped=$((skipped + 1)); return 0
    fi
  fi
  mkdir -p "$(dirname "$dst")"
  # Write to a temporary name first so a failed compile never leaves a stale object behind.
  if "$clang" "${cflags[@]}" -c "$src" -o "$dst.tmp"; then
    mv -f "$dst.tmp" "$dst"; built=$((built + 1))
  else
    rm -f "$dst.tmp" "$dst"; echo "build:bpf: FAILED $src" >&2; failed=$((failed + 1))
  fi
}

shopt -s nullglob
for src in "$root"/bpf/*.bpf.c; do
  compile "$src" "$out/$(basename "$src" .bpf.c).o"
done
for src in "$root"/test/fixtures/bpf/*.bpf.c; do
  compile "$src" "$out/fixtures/$(basename "$src" .bpf.c).o"
done

echo "build:bpf: $built built, $skipped up to date, $failed failed -> ${out#"$root"/}"
[ "$failed" -eq 0 ] || exit 1
