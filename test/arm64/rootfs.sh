#!/usr/bin/env bash
# Stage "rootfs": the VM's initramfs, as two concatenated cpio archives (the
# kernel unpacks them one after the other into its root file system):
#   base.cpio     unpacked arm64 .debs (busybox, iproute2, bpftool, iptables and
#                 their libraries), the kernel modules, the arm64 node, the
#                 project's node_modules. Rebuilt only when one of those changes.
#   project.cpio  the staged tree (sources, tests, BPF objects, arm64 addon),
#                 /init and the list of tests to run. Rebuilt every run (small).
# No package maintainer script runs: nothing is configured that the tests need.
source "$(dirname "$0")/lib.sh"

vm="$CACHE/vm"
kver=$(cat "$CACHE/kernel/current")
kdir="$CACHE/kernel/$kver"
mkdir -p "$vm"

# Packages only the controller or the developer tools load; the VM runs the
# eBPF tests only. Leaving them out halves the initramfs.
skip_modules=(@kubernetes kubernetes-models @kubernetes-models eslint @eslint @eslint-community
  @typescript-eslint typescript-eslint node-gyp)

cpio_of() { # dir -> stdout, owned by root, sorted for reproducible archives
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet)
}

key=$(key_of "$(cat "$CACHE/rootfs.debs")" "$kdir/modules.order" "$NODE_VERSION" "$ROOT/node_modules/.package-lock.json" "${skip_modules[*]}" "$ROOT/test/arm64/rootfs.sh")
if [ -s "$vm/base.cpio" ] && [ "$(cat "$vm/base.key" 2>/dev/null)" = "$key" ]; then
  say "base layer up to date ($(du -m "$vm/base.cpio" | cut -f1) MiB)"
else
  r="$vm/base.root"
  rm -rf "$r"; mkdir -p "$r"
  while read -r deb; do dpkg-deb -x "$deb" "$r"; done <"$CACHE/rootfs.debs"
  # busybox provides every command no package brought (sh, mount, insmod, nsenter, ...).
  qemu-aarch64 "$r/bin/busybox" --list-full | while read -r applet; do
    [ -e "$r/$applet" ] || [ -L "$r/$applet" ] || { mkdir -p "$r/$(dirname "$applet")"; ln -s /bin/busybox "$r/$applet"; }
  done
  # What update-alternatives would do: iptables is the legacy (x_tables) backend,
  # which needs fewer modules than nft.
  for t in iptables iptables-save iptables-restore; do ln -sfn "xtables-legacy-multi" "$r/usr/sbin/$t"; done
  mkdir -p "$r"/{proc,sys,dev,run,tmp,root,etc,usr/local/bin,fsm}
  mknod -m 600 "$r/dev/console" c 5 1
  cp -a "$kdir/lib/." "$r/lib/"
  cp "$kdir/modules.order" "$r/etc/fsm-modules"
  "$TRIPLET-strip" -o "$r/usr/local/bin/node" "$NODE_BIN"
  excludes=(); for m in "${skip_modules[@]}"; do excludes+=(--exclude="./$m"); done
  mkdir -p "$r/fsm/node_modules"
  tar -C "$ROOT/node_modules" "${excludes[@]}" -cf - . | tar -C "$r/fsm/node_modules" -xf -
  cpio_of "$r" >"$vm/base.cpio.tmp"
  mv -f "$vm/base.cpio.tmp" "$vm/base.cpio"
  rm -rf "$r"
  echo "$key" >"$vm/base.key"
  say "base layer built ($(du -m "$vm/base.cpio" | cut -f1) MiB)"
fi

p="$vm/project.root"
rm -rf "$p"; mkdir -p "$p/fsm" "$p/etc"
tar -C "$TREE" --exclude=./node_modules -cf - . | tar -C "$p/fsm" -xf -
install -m 755 "$(dirname "$0")/vm-init.sh" "$p/init"
printf '%s\n' "${VM_TESTS[@]}" >"$p/etc/fsm-vm-tests"
cpio_of "$p" >"$vm/project.cpio"
rm -rf "$p"
cat "$vm/base.cpio" "$vm/project.cpio" >"$vm/initrd.cpio"
echo "initramfs $(du -m "$vm/initrd.cpio" | cut -f1) MiB (base $(du -m "$vm/base.cpio" | cut -f1) + project $(du -m "$vm/project.cpio" | cut -f1)), kernel modules: $(wc -l <"$kdir/modules.order")" >"$CACHE/detail/rootfs"
