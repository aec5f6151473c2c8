import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

let root: string | undefined;

/**
 * The fsm-node package root, found by walking up from this module: works the
 * same from src/ (tests through ts-jest) and from dist/src/ (the built CLI).
 */
export function packageRoot(): string {
  if (root) return root;
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'fsm-node') return (root = dir);
    const up = dirname(dir);
    if (up === dir) throw new Error('fsm-node package root not found above ' + fileURLToPath(import.meta.url));
    dir = up;
  }
}

/** Where `npm run build:bpf` puts the BPF objects. */
export const bpfObjectDir = (): string => join(packageRoot(), 'bpf', 'build');
