#!/bin/sh
# /init of the arm64 VM (busybox sh as PID 1). Mounts what a node has (proc,
# sys, cgroup2, bpffs), loads the modules the topology needs, runs the tests
# listed in /etc/fsm-vm-tests with jest on the arm64 node, prints one line per
# test and per suite prefixed "fsm-arm64:" on the serial console for the host,
# then powers off. PID 1 must never exit (the kernel would panic), so every
# path ends in poweroff.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp FORCE_COLOR=0 CI=true

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
hostname fsm-arm64
ip link set lo up

echo "fsm-arm64: kernel $(uname -r) $(uname -m), $(nproc) cpus, bpf_jit_enable=$(cat /proc/sys/net/core/bpf_jit_enable), node $(node --version) $(node -p process.arch)"
failed_modules=""
while read -r ko; do
  insmod "$ko" 2>/dev/null || grep -q "^$(basename "$ko" .ko) " /proc/modules || failed_modules="$failed_modules $ko"
done </etc/fsm-modules
[ -z "$failed_modules" ] || echo "fsm-arm64: modules that failed to load:$failed_modules"

# Where the time and the memory go (TCG is slow; the initramfs lives in RAM).
stamp() { echo "fsm-arm64: $1 at $(cut -d' ' -f1 /proc/uptime) s uptime, $(awk '/MemAvailable/{ print int($2 / 1024) }' /proc/meminfo) MiB available"; }
stamp "booted"

cd /fsm || { echo "fsm-arm64: no /fsm"; poweroff -f; }
# Word splitting is wanted: one test path per line of the list. Every
# instruction is emulated, so tests get 3 minutes instead of jest's 1 (a
# timeout is not what these tests assert; so do the hooks that set no
# limit of their own, like the topology set-ups of the kernel tests).
# shellcheck disable=SC2046
node --experimental-vm-modules node_modules/jest/bin/jest.js --selectProjects unit kernel \
  --runInBand --testTimeout=180000 --json --outputFile=/tmp/jest.json $(cat /etc/fsm-vm-tests)
echo "fsm-arm64: jest exit $?"
stamp "jest finished"
# shellcheck disable=SC2016 # JavaScript, not shell
node -e '
  const r = JSON.parse(require("fs").readFileSync("/tmp/jest.json", "utf8"));
  for (const s of r.testResults) {
    const file = s.name.replace(/^\/fsm\//, "");
    const n = (st) => s.assertionResults.filter((a) => a.status === st).length;
    for (const a of s.assertionResults) console.log(`fsm-arm64: test ${a.status} ${file} > ${a.fullName} (${((a.duration ?? 0) / 1000).toFixed(1)} s)`);
    if (s.status === "failed" && s.assertionResults.length === 0) console.log(`fsm-arm64: suite error ${file}: ${s.message.split("\n").slice(0, 5).join(" | ")}`);
    console.log(`fsm-arm64: suite ${file} passed=${n("passed")} failed=${n("failed") + (s.status === "failed" && s.assertionResults.length === 0 ? 1 : 0)} skipped=${n("pending") + n("todo")}`);
  }
' || echo "fsm-arm64: no jest report"
echo "fsm-arm64: done"
sync
poweroff -f
