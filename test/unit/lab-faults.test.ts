import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { get, serve } from '../../src/lab/echo-server.js';
import { FaultWatch, linkActionFromFlags, parsePodFault, podFaultFromFlags, renderLinkCommands, writePodFault } from '../../src/lab/faults.js';

describe('lab fault flags', () => {
  it('takes exactly one fault', () => {
    expect(podFaultFromFlags({ status: '503' })).toEqual({ kind: 'status', status: 503 });
    expect(podFaultFromFlags({ hang: true })).toEqual({ kind: 'hang' });
    expect(podFaultFromFlags({ close: true })).toEqual({ kind: 'close' });
    expect(podFaultFromFlags({ clear: true })).toBeUndefined();
    expect(() => podFaultFromFlags({})).toThrow(/exactly one of --status CODE, --hang, --close, --clear/);
    expect(() => podFaultFromFlags({ hang: true, close: true })).toThrow(/--hang --close/);
  });
  it('names a bad status', () => {
    expect(() => podFaultFromFlags({ status: '50x' })).toThrow(/invalid --status "50x"/);
    expect(() => podFaultFromFlags({ status: '700' })).toThrow(/200 to 599/);
  });
  it('rejects a broken fault file with its field', () => {
    expect(() => parsePodFault('{"kind":"explode"}', 'f.json')).toThrow(/invalid f.json.kind "explode"/);
    expect(() => parsePodFault('{', 'f.json')).toThrow(/not JSON/);
  });
});

describe('lab link', () => {
  const node = { netns: 'fsmlab-n2', index: 2 };
  it('shapes both ends of the underlay link', () => {
    const a = linkActionFromFlags({ delay: '50', loss: '5' });
    expect(renderLinkCommands('fsmlab', node, a)).toEqual([
      { cmd: 'tc', args: ['-n', 'fsmlab-n2', 'qdisc', 'replace', 'dev', 'ul0', 'root', 'netem', 'delay', '50ms', 'loss', '5%'] },
      { cmd: 'tc', args: ['-n', 'fsmlab-ul', 'qdisc', 'replace', 'dev', 'u2', 'root', 'netem', 'delay', '50ms', 'loss', '5%'] },
    ]);
  });
  it('cuts and restores at the bridge end; clear removes netem too', () => {
    expect(renderLinkCommands('fsmlab', node, linkActionFromFlags({ down: true }))).toEqual([{ cmd: 'ip', args: ['-n', 'fsmlab-ul', 'link', 'set', 'u2', 'down'] }]);
    const clear = renderLinkCommands('fsmlab', node, linkActionFromFlags({ clear: true }));
    expect(clear.map((c) => c.args.join(' '))).toEqual(['-n fsmlab-n2 qdisc del dev ul0 root', '-n fsmlab-ul qdisc del dev u2 root', '-n fsmlab-ul link set u2 up']);
  });
  it('names bad flags', () => {
    expect(() => linkActionFromFlags({ delay: '-3' })).toThrow(/invalid --delay "-3"/);
    expect(() => linkActionFromFlags({ loss: '120' })).toThrow(/invalid --loss "120"/);
    expect(() => linkActionFromFlags({ down: true, delay: '5' })).toThrow(/--delay\/--loss --down/);
    expect(() => linkActionFromFlags({})).toThrow(/lab link flags/);
  });
});

describe('echo server under a fault file', () => {
  let dir: string;
  let file: string;
  let server: ReturnType<typeof serve>;
  let url: string;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'fsmn-faults-'));
    file = join(dir, 'faults', 'p1.json');
    server = serve('p1', 0, { faultFile: file, host: '127.0.0.1' });
    await once(server, 'listening');
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/x`;
  });
  afterAll(async () => {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
    rmSync(dir, { recursive: true, force: true });
  });

  it('answers normally, then with the status, hangs, closes, and recovers when cleared', async () => {
    expect((await get(url)).status).toBe(200);
    writePodFault(file, { kind: 'status', status: 503 });
    const r503 = await get(url);
    expect(r503.status).toBe(503);
    expect(JSON.parse(r503.body!).pod).toBe('p1');
    writePodFault(file, { kind: 'hang' });
    const hung = await get(url, 300);
    expect(hung.ok).toBe(false);
    expect(hung.error).toMatch(/no answer within 300 ms/);
    writePodFault(file, { kind: 'close' });
    const closed = await get(url);
    expect(closed.ok).toBe(false);
    expect(closed.error).toMatch(/socket hang up|ECONNRESET/);
    writePodFault(file, undefined);
    expect((await get(url)).status).toBe(200);
  });

  it('a broken fault file is reported and ignored', () => {
    const errors: string[] = [];
    const w = new FaultWatch(join(dir, 'broken.json'), (e) => errors.push(e.message));
    writeFileSync(join(dir, 'broken.json'), '{"kind":"status","status":42}');
    expect(w.get()).toBeUndefined();
    expect(errors[0]).toMatch(/broken.json.status 42: must be an HTTP status/);
  });
});
