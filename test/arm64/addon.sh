#!/usr/bin/env bash
# Stage "addon": cross-build native/ for arm64 with Debian's aarch64 compiler,
# against the arm64 libbpf/libelf/zlib of the sysroot and the headers of the
# arm64 node itself (--nodedir), into .cache/arm64/addon/build. The project's
# own build/ (the x86 addon the other tiers load) is never touched.
source "$(dirname "$0")/lib.sh"

src="$CACHE/addon"
key=$(key_of "$ROOT/binding.gyp" "$ROOT/native" "$(cat "$SYSROOT/.key")" "$NODE_VERSION" "$("$TRIPLET-g++" --version | head -1)")
if [ -f "$ADDON" ] && [ "$(cat "$src/.key" 2>/dev/null)" = "$key" ]; then
  say "addon up to date (${ADDON#"$ROOT"/})"
else
  rm -rf "$src"; mkdir -p "$src"
  cp -a "$ROOT/binding.gyp" "$ROOT/native" "$src/"
  # binding.gyp asks node-addon-api (arch-independent headers) for its include dir.
  ln -s "$ROOT/node_modules" "$src/node_modules"
  libdirs="$SYSROOT/usr/lib/$TRIPLET:$SYSROOT/lib/$TRIPLET"
  (
    cd "$src"
    export CC="$TRIPLET-gcc" CXX="$TRIPLET-g++" LINK="$TRIPLET-g++" AR="$TRIPLET-ar"
    export CFLAGS="-isystem $SYSROOT/usr/include" CXXFLAGS="-isystem $SYSROOT/usr/include"
    export LDFLAGS="-L$SYSROOT/usr/lib/$TRIPLET -L$SYSROOT/lib/$TRIPLET -Wl,-rpath-link,$libdirs"
    "$ROOT/node_modules/.bin/node-gyp" rebuild --arch=arm64 --nodedir="$NODE_DIR" -j 2 --loglevel=warn
  )
  echo "$key" >"$src/.key"
fi

desc=$(file -L "$ADDON")
echo "$desc" | grep -q 'ARM aarch64' || die "not an aarch64 object: $desc"
needed=$("$TRIPLET-readelf" -d "$ADDON" | awk '/NEEDED/{ gsub(/[][]/, "", $5); printf "%s ", $5 }')
case " $needed" in *" libbpf.so"*) die "libbpf must be linked statically, the addon needs: $needed" ;; esac
say "$desc"
echo "aarch64 ELF, $(stat -c %s "$ADDON") bytes, libbpf static, needs: ${needed% }" >"$CACHE/detail/addon"

# ---- the project as the arm64 runs see it: sources and tests as they are now,
# the BPF objects of bpf/build (built by the host's clang: BPF bytecode is the
# same for every architecture) and the arm64 addon where src/ebpf/native.ts
# looks for it. node_modules is the host's (JavaScript only; the VM gets a copy).
bash "$ROOT/bpf/build.sh" >/dev/null
rm -rf "$TREE.tmp"; mkdir -p "$TREE.tmp/build/Release"
tar -C "$ROOT" --exclude=./node_modules --exclude=./build --exclude=./.cache --exclude=./.git -cf - . | tar -C "$TREE.tmp" -xf -
cp "$ADDON" "$TREE.tmp/build/Release/fsm_bpf.node"
# The CNI plugin, cross-built (static) in place of the host's, and run under
# qemu-aarch64: VERSION, and ADD with the agent unreachable in a fail-open
# conf, which must pass prevResult through unchanged.
plugin="$TREE.tmp/cni/build/fsm-node-cni"
CC="$TRIPLET-gcc" OUT="$plugin" bash "$ROOT/cni/build.sh" >/dev/null
file -b "$plugin" | grep -q 'ARM aarch64' || die "the CNI plugin is not an aarch64 binary: $(file -b "$plugin")"
CNI_COMMAND=VERSION qemu-aarch64 "$plugin" </dev/null | grep -q '"supportedVersions"' || die "the arm64 CNI plugin does not answer VERSION"
prev='{"cniVersion":"1.0.0","ips":[{"address":"10.9.0.2/32"}]}'
got=$(echo "{\"cniVersion\":\"1.0.0\",\"socket\":\"/nonexistent/cni.sock\",\"failurePolicy\":\"fail-open\",\"prevResult\":$prev}" | CNI_COMMAND=ADD CNI_CONTAINERID=arm64 CNI_NETNS=/x qemu-aarch64 "$plugin")
[ "$got" = "$prev" ] || die "the arm64 CNI plugin, agent unreachable and fail-open, printed $got instead of prevResult"
sed -i '$ s/$/; CNI plugin aarch64 static, VERSION and fail-open ADD ok under qemu-aarch64/' "$CACHE/detail/addon"
ln -s "$ROOT/node_modules" "$TREE.tmp/node_modules"
rm -rf "$TREE"; mv "$TREE.tmp" "$TREE"
