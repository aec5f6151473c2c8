import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Every program the code, tests and benchmarks execute is in .ci/packages,
 * the one list .ci/setup installs from (issue 16: a fresh machine had no nft).
 * The scan reads the TypeScript/JavaScript sources for the shapes this project
 * spawns with; the shell scripts' programs are proven by .ci/fresh-root, which
 * runs them on a minimal Debian.
 */

const root = fileURLToPath(new URL('../..', import.meta.url));

export interface PackageLine {
  pkg: string;
  programs: string[];
  why: string;
}

/** .ci/packages: "<package> <program>... # why", "-" for none. */
export function parsePackages(text: string): PackageLine[] {
  const out: PackageLine[] = [];
  for (const raw of text.split('\n')) {
    if (/^\s*(#|$)/.test(raw)) continue;
    const hash = raw.indexOf('#');
    const [pkg, ...programs] = (hash < 0 ? raw : raw.slice(0, hash)).trim().split(/\s+/);
    out.push({ pkg: pkg!, programs: programs.filter((p) => p !== '-'), why: hash < 0 ? '' : raw.slice(hash + 1).trim() });
  }
  return out;
}

const SHELL_BUILTINS = new Set(['echo', 'exit', 'exec', 'shift', 'cd', 'set', 'export', 'test', 'true', 'false', 'read', 'printf', 'command', 'trap', 'wait', 'kill', 'eval', 'local', 'return']);
const KEYWORDS = new Set(['do', 'then', 'else', 'while', 'until', 'if', '!']);
// Programs that run the program named after their options.
const WRAPPERS = new Set(['exec', 'stdbuf', 'nsenter', 'setpriv', 'timeout', 'env']);
const WORD = /^[a-z][a-z0-9_.+-]*$/;

/** Programs a `sh -c` script runs: the first word of each command, and what a wrapper runs. */
export function shellPrograms(script: string): string[] {
  const out: string[] = [];
  for (const segment of script.split(/;|&&|\|\||\||\n/)) {
    const words = segment.trim().split(/\s+/).filter((w) => !/^\w+=/.test(w));
    for (let i = 0; i < words.length; i++) {
      const w = words[i]!;
      if (KEYWORDS.has(w)) continue; // `do curl ...`, `then x`: the command follows
      if (!WORD.test(w) || w === 'for' || w === 'done' || w === 'fi') break;
      if (!SHELL_BUILTINS.has(w)) out.push(w);
      if (!WRAPPERS.has(w)) break;
      while (i + 1 < words.length && (words[i + 1]!.startsWith('-') || /^\d/.test(words[i + 1]!))) i++;
    }
  }
  return out;
}

export interface Use {
  program: string;
  where: string;
}

const Q = `['"\`]`;
const LIT = `${Q}([^'"\`\\n]+?)${Q}`;
// The functions this project starts programs with (src/util/exec.ts run,
// node:child_process, the topology's node/pod exec and run, test helpers).
const SPAWNERS = 'run|runCommand|exec|spawn|spawnSync|execFile|execFileSync|pexec|inNode|wrap';
const PATTERNS: RegExp[] = [
  // run('nft', [...]), spawn('prometheus', [...]), node.exec('ss', [...]), execFileSync('ip', [...])
  new RegExp(`\\b(?:${SPAWNERS})\\(\\s*${LIT}\\s*,\\s*\\[`, 'g'),
  // sh(node, 'iptables-nft-save', [...]), sh(n2, 'iptables-legacy', rule.split(' '))
  new RegExp(`\\bsh\\(\\s*[\\w.!]+\\s*,\\s*${LIT}\\s*,`, 'g'),
  // [command, args] pairs: ['ip', ['-o', 'link', 'show']]
  new RegExp(`\\[\\s*${LIT}\\s*,\\s*\\[\\s*${Q}`, 'g'),
  // argv prefixes of wrappers: ['nsenter', `--net=...`, '--'], ['setpriv', ...]
  new RegExp(`\\[\\s*${Q}(nsenter|setpriv|stdbuf|timeout|env)${Q}\\s*,`, 'g'),
  // a default binary: const bin = o.openssl ?? 'openssl'
  new RegExp(`\\b(?:bin|cmd|command|program)\\w*\\s*=\\s*[^;\\n]*\\?\\?\\s*${LIT}`, 'g'),
];
const SHELL_SCRIPT = new RegExp(`${Q}-c${Q}\\s*,\\s*${LIT}`, 'g');

/** Programs a TypeScript/JavaScript source executes, with file:line. */
export function executedPrograms(source: string, file: string): Use[] {
  const uses: Use[] = [];
  const at = (index: number) => `${file}:${source.slice(0, index).split('\n').length}`;
  for (const re of PATTERNS) {
    for (const m of source.matchAll(re)) {
      const name = m[1]!;
      const program = name.startsWith('/') ? name.slice(name.lastIndexOf('/') + 1) : name;
      if (WORD.test(program.replace(/\$\{[^}]*\}/g, 'x'))) uses.push({ program, where: at(m.index) });
    }
  }
  for (const m of source.matchAll(SHELL_SCRIPT)) for (const program of shellPrograms(m[1]!)) uses.push({ program, where: at(m.index) });
  return uses;
}

/** A name with ${...} (iptables-${b}-save) matches any listed program of that shape. */
export function listed(program: string, programs: ReadonlySet<string>): boolean {
  if (!program.includes('${')) return programs.has(program);
  const re = new RegExp(`^${program.split(/\$\{[^}]*\}/).map((p) => p.replace(/[.+]/g, '\\$&')).join('[\\w.+-]+')}$`);
  return [...programs].some((p) => re.test(p));
}

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((e) => {
    const p = join(dir, e);
    if (statSync(p).isDirectory()) return e === 'node_modules' || e === 'golden' ? [] : sources(p);
    return /\.(ts|mjs|js)$/.test(e) && !e.endsWith('.d.ts') ? [p] : [];
  });
}

const packages = parsePackages(readFileSync(join(root, '.ci/packages'), 'utf8'));
const programs = new Set(packages.flatMap((l) => l.programs));
// This file names programs in its own examples: not scanned.
const self = fileURLToPath(import.meta.url);
const uses = ['src', 'test', 'bench']
  .flatMap((d) => sources(join(root, d)))
  .filter((f) => f !== self)
  .flatMap((f) => executedPrograms(readFileSync(f, 'utf8'), relative(root, f)));

describe('.ci/packages lists every program the project executes', () => {
  test('each line names a package, its programs and why', () => {
    expect(packages.length).toBeGreaterThan(20);
    for (const l of packages) {
      expect({ line: l.pkg, ok: /^([a-z0-9][a-z0-9.+-]+|-)$/.test(l.pkg) && l.why !== '' }).toEqual({ line: l.pkg, ok: true });
    }
    // The tools later issues need are installed ahead (issue 16).
    for (const p of ['nft', 'curl', 'tcpdump', 'mosquitto', 'mosquitto_pub']) expect(programs).toContain(p);
  });

  test('the scan finds the shapes this project spawns with', () => {
    const found = new Set(uses.map((u) => u.program));
    // One of each shape: run(), an argv array, a sh -c script and its wrapper,
    // a default binary, a templated backend name.
    for (const p of ['nft', 'bpftool', 'setpriv', 'nsenter', 'stdbuf', 'ipset', 'openssl', 'iptables-${b}-save', 'iptables-legacy', 'sysctl', 'prometheus']) expect(found).toContain(p);
  });

  test('a program missing from the list is reported with where it runs', () => {
    const src = "await run('frobnicate', ['--all']);\nconst c = spawn('/bin/sh', ['-c', 'exec stdbuf -o0 zapper - 2>&1']);\nrun('sh', ['-c', 'for i in 1 2; do quux -s; done']);\n";
    const missing = executedPrograms(src, 'x.ts').filter((u) => !listed(u.program, programs));
    expect(missing).toEqual([
      { program: 'frobnicate', where: 'x.ts:1' },
      { program: 'zapper', where: 'x.ts:2' },
      { program: 'quux', where: 'x.ts:3' },
    ]);
  });

  test('every executed program is in .ci/packages', () => {
    const missing = uses.filter((u) => !listed(u.program, programs)).map((u) => `${u.program} (${u.where})`);
    expect(missing).toEqual([]);
  });
});
