import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { DockerfileParser, type From, type Instruction } from 'dockerfile-ast';
import { validate, ValidationSeverity } from 'dockerfile-utils';
import { dockerIgnored, readDockerignore, root, sourceFiles } from './deploy-support.js';

/**
 * Dockerfile.multiarch without a Docker engine: it lints clean, its stages
 * run on the right platform, and every path it copies exists once
 * `npm run build` has run (and is not hidden by .dockerignore).
 */

const text = () => readFileSync(join(root, 'Dockerfile.multiarch'), 'utf8');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string; bin: Record<string, string> };

interface Stage {
  name: string | null;
  image: string;
  platform: string | undefined;
  instructions: Instruction[];
}

function stages(content: string): { args: Instruction[]; stages: Stage[] } {
  const df = DockerfileParser.parse(content);
  const out: Stage[] = [];
  const args: Instruction[] = [];
  for (const i of df.getInstructions()) {
    if (i.getKeyword() === 'FROM') {
      const f = i as From;
      out.push({ name: f.getBuildStage(), image: f.getImage() ?? '', platform: f.getPlatformFlag()?.getValue() ?? undefined, instructions: [] });
    } else if (out.length === 0) args.push(i);
    else out[out.length - 1]!.instructions.push(i);
  }
  return { args, stages: out };
}

const argsOf = (i: Instruction) => i.getArguments().map((a) => a.getValue());
const byKeyword = (s: Stage, k: string) => s.instructions.filter((i) => i.getKeyword() === k);
const copyFrom = (i: Instruction): string | undefined => (i as unknown as { getFromFlag(): { getValue(): string | null } | null }).getFromFlag()?.getValue() ?? undefined;

describe('Dockerfile.multiarch', () => {
  test('lints clean (dockerfile-utils, every rule an error)', () => {
    const E = ValidationSeverity.ERROR;
    const problems = validate(text(), {
      deprecatedMaintainer: E,
      directiveCasing: E,
      emptyContinuationLine: E,
      instructionCasing: E,
      instructionCmdMultiple: E,
      instructionEntrypointMultiple: E,
      instructionHealthcheckMultiple: E,
      instructionJSONInSingleQuotes: E,
      instructionWorkdirRelative: E,
    });
    expect(problems.map((p) => `line ${p.range.start.line + 1}: ${p.message}`)).toEqual([]);
    // The linter does find problems: a broken copy of the file fails.
    expect(validate(text().replace('COPY --from=bpf', 'COPY --form=bpf')).length).toBeGreaterThan(0);
  });

  test('BPF objects and TypeScript build once on the build platform; the addon per target; the runtime is the target', () => {
    const { stages: all } = stages(text());
    const named = (n: string) => all.find((s) => s.name === n)!;
    expect(all.map((s) => s.name)).toEqual(['bpf', 'ts', 'native', 'pipy', null]);
    expect(named('bpf').platform).toBe('$BUILDPLATFORM');
    expect(named('ts').platform).toBe('$BUILDPLATFORM');
    // Native code must match the target: no --platform, and it knows its TARGETARCH.
    expect(named('native').platform).toBeUndefined();
    expect(byKeyword(named('native'), 'ARG').map(argsOf).flat()).toContain('TARGETARCH');
    expect(named('pipy').platform).toBeUndefined();
    const runtime = all[all.length - 1]!;
    expect(runtime.platform).toBeUndefined();
    // Only architecture-independent output crosses from the build-platform stages.
    const fromStage = (s: string) => byKeyword(runtime, 'COPY').filter((c) => copyFrom(c) === s).map((c) => argsOf(c)[0]);
    expect(fromStage('bpf')).toEqual(['/src/bpf/build/*.o']);
    expect(fromStage('ts')).toEqual(['/src/dist/src/']);
    // The CNI plugin is native code too: built per target beside the addon.
    expect(fromStage('native')).toEqual(['/src/node_modules/', '/src/build/Release/fsm_bpf.node', '/src/cni/build/fsm-node-cni']);
    // BUILDPLATFORM appears nowhere else; TARGETARCH only where native code is built.
    expect(all.filter((s) => s.platform?.includes('BUILDPLATFORM')).map((s) => s.name)).toEqual(['bpf', 'ts']);
  });

  test('every path it copies exists after `npm run build` and is in the build context', () => {
    const built = ['dist/src/cli/bin.js', 'build/Release/fsm_bpf.node', 'bpf/build/connect4.o'];
    const missing = built.filter((p) => !existsSync(join(root, p)));
    if (missing.length > 0) throw new Error(`run \`npm run build\` before this test: missing ${missing.join(', ')}`);
    const ignore = readDockerignore();
    const { stages: all } = stages(text());
    // Stages built from this repository work in /src, a copy of the repository root.
    const repoStages = new Map(all.filter((s) => s.name && byKeyword(s, 'WORKDIR').some((w) => argsOf(w)[0] === '/src')).map((s) => [s.name!, s]));
    expect([...repoStages.keys()]).toEqual(['bpf', 'ts', 'native']);
    const checked: string[] = [];
    for (const s of all) {
      for (const c of byKeyword(s, 'COPY')) {
        const from = copyFrom(c);
        const sources = argsOf(c).slice(0, -1);
        for (const src of sources) {
          if (from === undefined) {
            expect({ src, ignored: dockerIgnored(ignore, src) }).toEqual({ src, ignored: false });
            expect({ src, files: sourceFiles(root, src).length > 0 }).toEqual({ src, files: true });
            checked.push(src);
          } else if (repoStages.has(from)) {
            // Produced in that stage by the same build steps `npm run build` runs here.
            const rel = src.replace(/^\/src\//, '');
            expect({ src, files: sourceFiles(root, rel).length > 0 }).toEqual({ src, files: true });
            checked.push(`${from}:${src}`);
          }
        }
      }
    }
    expect(checked).toEqual(expect.arrayContaining(['bpf/', 'src/', 'native/', 'proxy/', 'package.json', 'bpf:/src/bpf/build/*.o', 'ts:/src/dist/src/', 'native:/src/build/Release/fsm_bpf.node']));
  });

  test('.dockerignore keeps local build output and dependencies out of the context', () => {
    const ignore = readDockerignore();
    for (const p of ['node_modules/fastify/package.json', 'dist/src/cli/bin.js', 'build/Release/fsm_bpf.node', 'bpf/build/connect4.o', '.git/HEAD']) {
      expect({ p, ignored: dockerIgnored(ignore, p) }).toEqual({ p, ignored: true });
    }
    for (const p of ['bpf/connect4.bpf.c', 'src/cli/bin.ts', 'native/addon.cc', 'package-lock.json']) expect({ p, ignored: dockerIgnored(ignore, p) }).toEqual({ p, ignored: false });
  });

  test('the image runs the package CLI and carries the package version', () => {
    const { args, stages: all } = stages(text());
    const runtime = all[all.length - 1]!;
    expect(args.map(argsOf).flat()).toContain(`VERSION=${pkg.version}`);
    const entry = JSON.parse(byKeyword(runtime, 'ENTRYPOINT')[0]!.getArgumentsContent()!) as string[];
    expect(entry).toEqual(['node', `/app/${pkg.bin['fsm-node']}`]);
    expect(byKeyword(runtime, 'WORKDIR').map(argsOf).flat()).toEqual(['/app']);
    // `kubectl exec ... -- fsm-node status` needs the CLI on PATH.
    expect(text()).toContain(`ln -s /app/${pkg.bin['fsm-node']} /usr/local/bin/fsm-node`);
  });
});
