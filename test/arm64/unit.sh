#!/usr/bin/env bash
# Stage "unit": the unit tier, run by jest on the arm64 node under qemu-user
# against the arm64 addon of the staged tree.
#
# qemu-user translates the syscalls of an arm64 process onto this x86 kernel,
# but QEMU does not translate bpf(2): it answers ENOSYS. So the unit tests
# that load programs into the kernel (listed in VM_TESTS) run in the arm64 VM
# instead; everything else, including parsing the BPF objects through the
# addon (ebpf-abi), runs here. jest runs in band: its worker processes would be
# spawned from process.execPath, an arm64 binary the host cannot exec without a
# binfmt_misc handler, which this script does not register.
source "$(dirname "$0")/lib.sh"

export QEMU_LD_PREFIX="$SYSROOT"
arm64_node() { qemu-aarch64 "$NODE_BIN" "$@"; }

# Preflight: the arm64 node runs and loads the arm64 addon.
arm64_node -e "if (process.arch !== 'arm64') throw new Error('arch ' + process.arch); require(process.argv[1]);" "$TREE/build/Release/fsm_bpf.node" \
  || die "the arm64 node cannot load ${ADDON#"$ROOT"/} under qemu-aarch64"

ignore=() in_vm=""
for t in "${VM_TESTS[@]}"; do
  case "$t" in test/unit/*) ignore+=(--testPathIgnorePatterns "/${t//./\\.}\$"); in_vm="$in_vm $t" ;; esac
done
report="$CACHE/unit.json"
rm -f "$report"
set +e
(cd "$TREE" && arm64_node --experimental-vm-modules node_modules/jest/bin/jest.js \
  --selectProjects unit --runInBand --cacheDirectory="$CACHE/jest" --json --outputFile="$report" "${ignore[@]}")
status=$?
set -e
[ -s "$report" ] || die "jest wrote no report (exit $status)"
# shellcheck disable=SC2016 # JavaScript, not shell
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const skipped = r.numPendingTests + r.numTodoTests;
  console.log(`${r.numPassedTests} passed, ${r.numFailedTests} failed, ${skipped} skipped in ${r.numTotalTestSuites} suites under qemu-aarch64 (node ${process.argv[2]}); in the VM instead: ${process.argv[3]}`);
' "$report" "$NODE_VERSION" "${in_vm# }" >"$CACHE/detail/unit"
node -p 'const r = require(process.argv[1]); r.numPassedTests + " " + r.numFailedTests' "$report" >"$CACHE/detail/unit.counts"
say "unit: $(cat "$CACHE/detail/unit")"
exit "$status"
