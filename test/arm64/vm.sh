#!/usr/bin/env bash
# Stage "vm": boot Debian's arm64 kernel with the initramfs under
# qemu-system-aarch64 (TCG: every arm64 instruction emulated, so the BPF
# verifier, the arm64 BPF JIT and the cgroup hooks are the real arm64 kernel's),
# let /init run the tests, and judge them from the serial console.
# The VM has no network device at all (-nic none): nothing reaches the host's
# network, and the tests build their own namespaces inside the VM.
source "$(dirname "$0")/lib.sh"

vm="$CACHE/vm"
kver=$(cat "$CACHE/kernel/current")
log="$vm/serial.log"
timeout_s="${FSMN_ARM64_VM_TIMEOUT:-900}"
: >"$log"

say "booting $kver (qemu-system-aarch64, TCG, cortex-a57, 2 cpus); serial log: ${log#"$ROOT"/}"
qemu-system-aarch64 -M virt -cpu cortex-a57 -smp 2 -m "${FSMN_ARM64_VM_MEM:-1024}" -accel tcg,thread=multi \
  -kernel "$CACHE/kernel/$kver/vmlinuz" -initrd "$vm/initrd.cpio" \
  -append "console=ttyAMA0 rdinit=/init panic=-1 quiet" \
  -nodefaults -no-user-config -nic none -display none -monitor none -serial "file:$log" -no-reboot &
qemu=$!
trap 'kill "$qemu" 2>/dev/null || true' EXIT
# Forward the init script's own lines live; the full console stays in the log.
tail -n +1 -F "$log" --pid="$qemu" 2>/dev/null | grep --line-buffered '^fsm-arm64:' &
follower=$!
waited=0
while kill -0 "$qemu" 2>/dev/null; do
  if [ "$waited" -ge "$timeout_s" ]; then
    kill "$qemu"; wait "$follower" 2>/dev/null || true
    tail -n 60 "$log" >&2
    die "the VM did not power off within ${timeout_s}s (FSMN_ARM64_VM_TIMEOUT)"
  fi
  sleep 2; waited=$((waited + 2))
done
wait "$qemu" || die "qemu-system-aarch64 failed (exit $?); see ${log#"$ROOT"/}"
wait "$follower" 2>/dev/null || true
tr -d '\r' <"$log" >"$log.txt"

# Pass only if every listed test file (unit or kernel tier) ran with no failure
# and nothing skipped.
bad=0
grep -q '^fsm-arm64: done' "$log.txt" || { say "the VM never finished its run"; bad=1; }
grep -q '^fsm-arm64: modules that failed' "$log.txt" && bad=1
# jest's own verdict too: a global setup or teardown can fail with every test green.
grep -q '^fsm-arm64: jest exit 0$' "$log.txt" || { say "jest in the VM did not exit 0"; bad=1; }
for t in "${VM_TESTS[@]}"; do
  line=$(grep "^fsm-arm64: suite $t " "$log.txt" || true)
  case "$line" in
    *" failed=0 skipped=0") [[ "$line" =~ passed=[1-9] ]] || { say "$t: no test passed"; bad=1; } ;;
    "") say "$t: did not run"; bad=1 ;;
    *) say "$t: $line"; bad=1 ;;
  esac
done
kline=$(grep -m1 '^fsm-arm64: kernel ' "$log.txt" | sed 's/^fsm-arm64: //')
passed=$(grep -c '^fsm-arm64: test passed ' "$log.txt" || true)
failed=$(grep -c '^fsm-arm64: test failed ' "$log.txt" || true)
echo "$passed passed, $failed failed (${VM_TESTS[*]}) on ${kline:-an unknown kernel}" >"$CACHE/detail/vm"
echo "$passed $failed" >"$CACHE/detail/vm.counts"
if [ "$bad" -ne 0 ]; then
  grep -v '^fsm-arm64:' "$log.txt" | tail -n 80 >&2
  exit 1
fi
