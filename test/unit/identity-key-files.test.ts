import { chmodSync, chownSync, mkdirSync, mkdtempSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ownKeyFiles, unreachableFor } from '../../src/identity/key-files.js';

const PROXY = { uid: 1500, gid: 1500 };
let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'fsmt-keyfiles-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

describe('key files for a proxy with its own uid', () => {
  test('unreachableFor names the first directory the proxy user cannot traverse, with its mode', () => {
    // mkdtemp makes 0700 directories: exactly the trap a test or hardened host sets.
    const state = join(dir, 'state');
    mkdirSync(state, { mode: 0o755 });
    expect(unreachableFor(state, PROXY)).toEqual({ dir, mode: '0700' });
    chmodSync(dir, 0o711);
    expect(unreachableFor(state, PROXY)).toBeUndefined();
    // Owner bits count for the owner, group bits for the group.
    chmodSync(state, 0o700);
    expect(unreachableFor(state, PROXY)).toEqual({ dir: state, mode: '0700' });
    chownSync(state, 1500, 0);
    expect(unreachableFor(state, PROXY)).toBeUndefined();
    chownSync(state, 0, 1500);
    chmodSync(state, 0o710);
    expect(unreachableFor(state, PROXY)).toBeUndefined();
    // Not there yet: the agent creates it traversable.
    expect(unreachableFor(join(state, 'later', 'deeper'), PROXY)).toBeUndefined();
  });

  test('ownKeyFiles hands files to the proxy user, again after a change, and refuses symbolic links', async () => {
    const key = join(dir, 'key.pem');
    writeFileSync(key, 'k', { mode: 0o600 });
    await ownKeyFiles([dir, key], PROXY);
    expect(statSync(key)).toMatchObject({ uid: 1500, gid: 1500 });
    expect(statSync(key).mode & 0o777).toBe(0o600);
    await ownKeyFiles([key], { uid: 1501, gid: 1501 });
    expect(statSync(key)).toMatchObject({ uid: 1501, gid: 1501 });
    const link = join(dir, 'link.pem');
    symlinkSync('/etc/passwd', link);
    await expect(ownKeyFiles([link], PROXY)).rejects.toThrow(/is a symbolic link/);
    expect(statSync('/etc/passwd').uid).toBe(0);
  });
});
