import { isDeepStrictEqual } from 'node:util';

/**
 * Poll `probe` until `ok` holds or `timeoutMs` passes, and return the last
 * value: for kernel state that settles asynchronously (a map whose program
 * was just released is freed after an RCU grace period). The caller asserts
 * on the returned value, so a state that never settles still fails the test.
 */
export async function eventually<T>(probe: () => Promise<T>, ok: (v: T) => boolean, timeoutMs = 5000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (ok(v) || Date.now() > deadline) return v;
    await new Promise((r) => setTimeout(r, 50));
  }
}

export const eventuallyEqual = <T>(probe: () => Promise<T>, want: T, timeoutMs?: number): Promise<T> =>
  eventually(probe, (v) => isDeepStrictEqual(v, want), timeoutMs);
