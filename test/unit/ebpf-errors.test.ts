import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readlinkSync, rmdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { Worker } from 'node:worker_threads';
import { InvalidInputError } from '../../src/errors.js';
import {
  AttachType,
  BpfError,
  BpfMap,
  ClosedError,
  codecs,
  KeyNotFoundError,
  Link,
  ObjectSpec,
  Program,
  VerifierError,
  originalDst,
  type Collection,
} from '../../src/ebpf/index.js';
import { ensureBpffs, BPFFS_ROOT } from '../../src/lab/bpffs.js';
import { cgroup2Root } from '../../src/util/cgroup.js';

/**
 * The eBPF object model against the real kernel, through the real addon:
 * error paths (missing/corrupt object, verifier rejection, use after close),
 * all-or-nothing loads, maps, constants, pins, cgroup links, sockmap attach.
 * Needs root (jest runs as root here and in CI); everything it creates lives
 * under fsmt<pid>-ebpf names and is removed in afterAll.
 */

const root = resolve(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '../..');
const fixture = (name: string) => join(root, 'bpf/build/fixtures', `${name}.o`);
const addonPath = join(root, 'build/Release/fsm_bpf.node');
const isRoot = process.getuid?.() === 0;
const tag = `fsmt${process.pid}-ebpf`;
const pinDir = join(BPFFS_ROOT, tag);
let cgroupDir = '';

if (!isRoot) console.warn('ebpf-errors: skipped: loading BPF programs needs root (run jest as root)');
const suite = isRoot ? describe : describe.skip;

/** fds of this process that are BPF objects: what a leak or a half-done load would leave. */
function bpfFds(): number {
  let n = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).startsWith('anon_inode:bpf')) n++;
    } catch {
      // the fd of the readdir itself is gone by now
    }
  }
  return n;
}

function bpftoolJson(args: string[]): unknown {
  return JSON.parse(execFileSync('bpftool', ['-j', ...args], { encoding: 'utf8' }).trim() || 'null');
}

const u32 = (n: number) => codecs.u32.encode(n);

suite('ebpf object model (real kernel)', () => {
  beforeAll(async () => {
    for (const name of ['maps', 'verifier_reject']) {
      if (!existsSync(fixture(name))) throw new Error(`${fixture(name)} missing: run npm run build:bpf`);
    }
    if (!existsSync(addonPath)) throw new Error(`${addonPath} missing: run npm run build:native`);
    await ensureBpffs();
    mkdirSync(pinDir, { recursive: true });
    cgroupDir = join(cgroup2Root(), tag);
    mkdirSync(cgroupDir, { recursive: true });
  });

  afterAll(() => {
    rmSync(pinDir, { recursive: true, force: true });
    if (cgroupDir !== '' && existsSync(cgroupDir)) rmdirSync(cgroupDir);
  });

  describe('errors', () => {
    test('a missing object file names the path', () => {
      const path = join(tmpdir(), `${tag}-does-not-exist.o`);
      let err: unknown;
      try {
        ObjectSpec.fromFile(path);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(BpfError);
      expect((err as BpfError).message).toContain(path);
      expect((err as BpfError).errnoCode).toBe('ENOENT');
      expect((err as BpfError).code).toBe('FSMN_ERR_BPF');
    });

    test('a corrupt object is a BpfError naming the path', () => {
      const path = join(tmpdir(), `${tag}-garbage.o`);
      writeFileSync(path, Buffer.from('this is not an ELF file, just bytes '.repeat(20)));
      try {
        expect(() => ObjectSpec.fromFile(path)).toThrow(BpfError);
        expect(() => ObjectSpec.fromFile(path)).toThrow(path);
      } finally {
        rmSync(path, { force: true });
      }
    });

    test('a verifier rejection carries the log and leaves nothing behind', () => {
      const before = bpfFds();
      const spec = ObjectSpec.fromFile(fixture('verifier_reject'));
      let err: unknown;
      try {
        spec.load({ pinPath: pinDir });
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(VerifierError);
      const v = err as VerifierError;
      expect(v.code).toBe('FSMN_ERR_BPF_VERIFIER');
      expect(v.program).toBe('unchecked_read');
      expect(v.log).toMatch(/invalid access to map value, value_size=8 off=8 size=8/);
      expect(v.message).toContain("program 'unchecked_read'");
      expect(v.message).toContain('invalid access to map value');
      // all or nothing: no fd, and the pin of the by-name map was removed again
      expect(bpfFds()).toBe(before);
      expect(existsSync(join(pinDir, 'kept'))).toBe(false);
      // the spec was consumed
      expect(() => spec.setMaxEntries('values', 2)).toThrow(ClosedError);
      spec.close();
    });

    test('double close is fine; use after close is a ClosedError', () => {
      const spec = ObjectSpec.fromFile(fixture('maps'));
      spec.close();
      spec.close();
      expect(() => spec.load()).toThrow(ClosedError);

      const before = bpfFds();
      const coll = ObjectSpec.fromFile(fixture('maps')).load();
      expect(bpfFds()).toBeGreaterThan(before);
      const counters = coll.maps.counters!;
      const prog = coll.programs.get_answer!;
      coll.close();
      coll.close();
      counters.close();
      expect(bpfFds()).toBe(before);
      expect(() => counters.lookup(u32(1))).toThrow(ClosedError);
      expect(() => prog.fd).toThrow(ClosedError);
      expect(() => prog.attachCgroup(cgroupDir)).toThrow(ClosedError);
    });

    test('the addon closes what a worker thread left open when the worker exits', async () => {
      const before = bpfFds();
      const worker = new Worker(join(root, 'test/fixtures/bpf/leak-worker.mjs'), { workerData: { addon: addonPath, object: fixture('maps') } });
      // Listen for everything before awaiting anything: when the main thread is
      // busy, Node drains the worker's last message inside its exit handler and
      // emits 'exit' in the same callback, before an await could attach a listener.
      const exited = new Promise<number>((res) => worker.once('exit', res));
      const message = new Promise<{ fds: number }>((res, rej) => {
        worker.once('message', res);
        worker.once('error', rej);
        void exited.then((code) => rej(new Error(`worker exited (code ${code}) before reporting`)));
      });
      const msg = await message;
      expect(msg.fds).toBeGreaterThan(0);
      expect(await exited).toBe(0);
      expect(bpfFds()).toBe(before);
    });
  });

  describe('loaded collection', () => {
    let coll: Collection;
    beforeAll(() => {
      coll = ObjectSpec.fromFile(fixture('maps')).load();
    });
    afterAll(() => coll?.close());

    test('exposes maps and programs with kernel metadata', () => {
      expect(Object.keys(coll.maps).sort()).toEqual(expect.arrayContaining(['counters', 'slots', 'shared', 'socks']));
      const c = coll.maps.counters!;
      expect([c.type, c.keySize, c.valueSize, c.maxEntries]).toEqual([1, 4, 8, 16]);
      expect(coll.program('allow_connect4').expectedAttachType).toBe(AttachType.CgroupInet4Connect);
      expect(() => coll.program('nope')).toThrow(InvalidInputError);
      expect(() => coll.map('counters', codecs.u64, codecs.u64)).toThrow(/key codec size/);
    });

    test('map CRUD with typed codecs', () => {
      const m = coll.map('counters', codecs.u32, codecs.u64);
      expect(m.lookup(1)).toBeUndefined();
      expect(() => m.get(1)).toThrow(KeyNotFoundError);
      m.update(1, 10n);
      expect(m.get(1)).toBe(10n);
      m.update(1, 11n, 'exist');
      expect(m.lookup(1)).toBe(11n);
      expect(() => m.update(1, 12n, 'noexist')).toThrow(expect.objectContaining({ errnoCode: 'EEXIST' }));
      expect(() => m.update(2, 12n, 'exist')).toThrow(expect.objectContaining({ errnoCode: 'ENOENT' }));
      expect(m.delete(1)).toBe(true);
      expect(m.delete(1)).toBe(false);
      expect(() => m.update(-1, 0n)).toThrow(InvalidInputError);
    });

    test('iterate, batch update, batch delete', () => {
      const m = coll.map('counters', codecs.u32, codecs.u64);
      const entries: Array<[number, bigint]> = [1, 2, 3, 4, 5].map((k) => [k, BigInt(k * 100)]);
      m.updateBatch(entries);
      expect([...m.keys()].sort()).toEqual([1, 2, 3, 4, 5]);
      expect(new Map(m.entries())).toEqual(new Map(entries));
      expect(new Map(m.dump())).toEqual(new Map(entries));
      m.deleteBatch([1, 2]);
      expect([...m.keys()].sort()).toEqual([3, 4, 5]);
      expect(() => m.deleteBatch([3, 9])).toThrow(KeyNotFoundError);
      expect(m.lookup(3)).toBeUndefined(); // deleted before the missing key
      m.deleteBatch([4, 5]);
      expect([...m.keys()]).toEqual([]);
    });

    test('array maps: every index is a key; delete is not supported', () => {
      const a = coll.map('slots', codecs.u32, codecs.u32);
      a.updateBatch([[0, 7], [3, 9]]);
      expect([...a.entries()]).toEqual([[0, 7], [1, 0], [2, 0], [3, 9]]);
      expect(a.dump()).toEqual([[0, 7], [1, 0], [2, 0], [3, 9]]);
      expect(() => a.deleteBatch([0])).toThrow(BpfError);
    });

    test('batch ops fall back to one call per element where the kernel has none (sockhash)', async () => {
      const srv = createServer(() => undefined);
      await new Promise<void>((res) => srv.listen(0, '127.0.0.1', res));
      const c = connect((srv.address() as { port: number }).port, '127.0.0.1');
      try {
        await new Promise((res) => c.once('connect', res));
        const fd = (c as unknown as { _handle: { fd: number } })._handle.fd;
        const socks = coll.map('socks', codecs.u64, codecs.u64);
        socks.updateBatch([[1n, BigInt(fd)]]);
        expect(socks.lookup(1n)).toBeDefined(); // the kernel answers with the socket cookie
        socks.deleteBatch([1n]);
        expect(socks.lookup(1n)).toBeUndefined();
      } finally {
        c.destroy();
        srv.close();
      }
    });

    test('sk_msg program attaches to and detaches from a sockhash', () => {
      const prog = coll.program('pass_msg');
      const socks = coll.maps.socks!;
      prog.attachToMap(socks, AttachType.SkMsgVerdict);
      prog.detachFromMap(socks, AttachType.SkMsgVerdict);
      expect(() => prog.detachFromMap(socks, AttachType.SkMsgVerdict)).toThrow(BpfError);
    });
  });

  describe('spec editing', () => {
    test('setMaxEntries and setConstant take effect in the kernel', () => {
      const spec = ObjectSpec.fromFile(fixture('maps'));
      expect(spec.constants).toEqual(['answer', 'big', 'flag']);
      spec.setMaxEntries('counters', 64).setConstant('answer', 42).setConstant('flag', true).setConstant('big', 2n ** 40n);
      expect(spec.maps.get('counters')?.maxEntries).toBe(64);
      using coll = spec.load();
      expect(coll.maps.counters!.maxEntries).toBe(64);
      // read back through the program: it returns answer + 1000 when flag is set
      expect(coll.program('get_answer').testRun(Buffer.alloc(64)).retval).toBe(1042);
      // and through the frozen .rodata map
      const rodata = Object.values(coll.maps).find((m) => m.name.endsWith('.rodata'))!;
      const data = rodata.get(u32(0));
      expect(data.readUInt32LE(0)).toBe(42);
      expect(data.readBigUInt64LE(8)).toBe(2n ** 40n);
    });

    test('a larger map: batch update and a dump over several batch chunks', () => {
      using coll = ObjectSpec.fromFile(fixture('maps')).setMaxEntries('counters', 1024).load();
      const m = coll.map('counters', codecs.u32, codecs.u64);
      const entries: Array<[number, bigint]> = Array.from({ length: 600 }, (_, i) => [i * 7, BigInt(i)]);
      m.updateBatch(entries);
      const dumped = m.dump();
      expect(dumped).toHaveLength(600);
      expect(new Map(dumped)).toEqual(new Map(entries));
      expect(new Map(m.entries())).toEqual(new Map(entries));
    });

    test('bad edits name the field and value', () => {
      using spec = ObjectSpec.fromFile(fixture('maps'));
      expect(() => spec.setConstant('nope', 1)).toThrow(/constant "nope".*have: answer, big, flag/);
      expect(() => spec.setConstant('flag', 256)).toThrow(/constant flag.*does not fit in 1 bytes/);
      expect(() => spec.setConstant('answer', Buffer.alloc(3))).toThrow(/is 4 bytes, got 3/);
      expect(() => spec.setConstant('answer', 1.5)).toThrow(InvalidInputError);
      expect(() => spec.setMaxEntries('nope', 1)).toThrow(/map "nope"/);
      expect(() => spec.setMaxEntries('counters', 0)).toThrow(InvalidInputError);
      expect(() => spec.load({ pinPath: 'relative/dir' })).toThrow(/pinPath/);
    });
  });

  describe('pins', () => {
    test('map and program: pin -> fromPin -> unpin', () => {
      using coll = ObjectSpec.fromFile(fixture('maps')).load();
      const m = coll.map('counters', codecs.u32, codecs.u64);
      m.update(7, 70n);
      const mapPin = join(pinDir, 'counters');
      m.pin(mapPin);
      {
        using again = BpfMap.fromPin(mapPin, codecs.u32, codecs.u64);
        expect(again.id).toBe(m.id);
        expect(again.get(7)).toBe(70n);
      }
      expect(() => Program.fromPin(mapPin)).toThrow(/holds a map, not a prog/);
      m.unpin(mapPin);
      m.unpin(mapPin); // idempotent
      expect(existsSync(mapPin)).toBe(false);
      expect(() => BpfMap.fromPin(mapPin)).toThrow(expect.objectContaining({ errnoCode: 'ENOENT' }));

      const prog = coll.program('get_answer');
      const progPin = join(pinDir, 'get_answer');
      prog.pin(progPin);
      {
        using again = Program.fromPin(progPin);
        expect(again.id).toBe(prog.id);
      }
      prog.unpin(progPin);
      expect(existsSync(progPin)).toBe(false);
    });

    test('maps pinned by name are pinned at pinPath and reused by the next load', () => {
      const dir = join(pinDir, 'reuse');
      using first = ObjectSpec.fromFile(fixture('maps')).load({ pinPath: dir });
      expect(existsSync(join(dir, 'shared'))).toBe(true);
      expect(existsSync(join(dir, 'counters'))).toBe(false);
      first.maps.shared!.update(u32(1), u32(5));
      using second = ObjectSpec.fromFile(fixture('maps')).load({ pinPath: dir });
      expect(second.maps.shared!.id).toBe(first.maps.shared!.id);
      expect(second.maps.counters!.id).not.toBe(first.maps.counters!.id);
      expect(second.maps.shared!.get(u32(1))).toEqual(u32(5));
      // closing never unpins
      first.close();
      second.close();
      expect(existsSync(join(dir, 'shared'))).toBe(true);
      rmSync(dir, { recursive: true });
    });
  });

  describe('cgroup links', () => {
    type CgroupAttach = { id: number; attach_type: string; name: string };
    const attached = (): CgroupAttach[] => (bpftoolJson(['cgroup', 'show', cgroupDir]) as CgroupAttach[] | null) ?? [];

    test('attach, inspect, pin, reopen, atomic update, detach', () => {
      using coll = ObjectSpec.fromFile(fixture('maps')).load();
      const v1 = coll.program('allow_connect4');
      const v2 = coll.program('allow_connect4_v2');
      const link = v1.attachCgroup(cgroupDir);
      try {
        const info = link.info();
        expect(info.progId).toBe(v1.id);
        expect(info.attachType).toBe(AttachType.CgroupInet4Connect);
        expect(info.cgroupId).toBe(statSync(cgroupDir, { bigint: true }).ino);
        expect(attached().map((a) => a.id)).toEqual([v1.id]);

        const pin = join(pinDir, 'connect4-link');
        link.pin(pin);
        link.close(); // a pinned link stays attached
        expect(attached().map((a) => a.id)).toEqual([v1.id]);

        using again = Link.fromPin(pin);
        expect(again.pinnedAt).toBe(pin);
        again.update(v2, { expected: v1 });
        expect(again.info().progId).toBe(v2.id);
        expect(() => again.update(v1, { expected: v1 })).toThrow(/no longer the attached one/);
        expect(attached().map((a) => a.id)).toEqual([v2.id]);

        again.detach();
        expect(attached()).toEqual([]);
        again.unpin();
        expect(existsSync(pin)).toBe(false);
      } finally {
        link.close();
      }
    });

    test('attach errors name what is wrong', () => {
      using coll = ObjectSpec.fromFile(fixture('maps')).load();
      const prog = coll.program('allow_connect4');
      expect(() => prog.attachCgroup(tmpdir())).toThrow(/cgroupPath.*not on a cgroup v2/);
      expect(() => prog.attachCgroup(join(cgroupDir, 'missing'))).toThrow(/cgroupPath/);
      expect(() => prog.attachCgroup(cgroupDir, AttachType.CgroupGetsockopt)).toThrow(/attach type 21/);
      expect(attached()).toEqual([]);
    });
  });

  describe('SO_ORIGINAL_DST', () => {
    let server: Server | undefined;
    let client: Socket | undefined;
    const netns = tag;
    afterAll(() => {
      client?.destroy();
      server?.close();
      spawnSync('ip', ['netns', 'delete', netns], { stdio: 'ignore' }); // absent if the test failed early
    });

    test('a connection that was not redirected has no original destination', async () => {
      const srv = createServer(() => undefined);
      server = srv;
      await new Promise<void>((res) => srv.listen(0, '127.0.0.1', res));
      const port = (srv.address() as { port: number }).port;
      const c = connect(port, '127.0.0.1');
      client = c;
      await new Promise((res) => c.once('connect', res));
      const fd = (c as unknown as { _handle: { fd: number } })._handle.fd;
      expect(fd).toBeGreaterThan(2);
      expect(() => originalDst(fd)).toThrow(expect.objectContaining({ syscall: 'getsockopt(SO_ORIGINAL_DST)' }));
    });

    test('a REDIRECTed connection reports where it was going (private netns + iptables)', () => {
      execFileSync('ip', ['netns', 'add', netns]);
      execFileSync('ip', ['-n', netns, 'link', 'set', 'lo', 'up']);
      execFileSync('ip', ['netns', 'exec', netns, 'iptables', '-t', 'nat', '-A', 'OUTPUT', '-p', 'tcp', '--dport', '8080', '-j', 'REDIRECT', '--to-ports', '15001']);
      const out = execFileSync('ip', ['netns', 'exec', netns, process.execPath, join(root, 'test/fixtures/bpf/original-dst.mjs'), addonPath, '15001', '8080'], {
        encoding: 'utf8',
      });
      expect(JSON.parse(out)).toEqual({ address: '127.0.0.1', port: 8080 });
    });
  });
});
