import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadAgentConfig, proxyRunAs } from '../../src/agent/config.js';

const required = {
  node: 'edge-1',
  controller: 'https://controller:15443',
  caFile: '/etc/fsm/ca.pem',
  tokenFile: '/var/run/token',
  podsCgroup: '/sys/fs/cgroup/kubepods.slice',
  proxyCgroup: '/sys/fs/cgroup/fsm-node-proxy',
  proxyAddress: '10.0.0.1',
};

const dirs: string[] = [];
const tempDir = (): string => {
  const d = mkdtempSync(join(tmpdir(), 'fsmn-config-'));
  dirs.push(d);
  return d;
};
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

describe('agent configuration', () => {
  test('defaults fill what is not given', () => {
    const c = loadAgentConfig(required, {});
    expect(c).toMatchObject({ mode: 'auto', listen: '0.0.0.0:15900', outboundPort: 15001, inboundPort: 15003, fastPath: true });
  });

  test('precedence: file < env < flags', () => {
    const dir = tempDir();
    const file = join(dir, 'agent.yaml');
    writeFileSync(file, 'mode: iptables\nlisten: 127.0.0.1:1\noutboundPort: 16001\n');
    const c = loadAgentConfig({ ...required, listen: '127.0.0.1:3' }, { FSMN_LISTEN: '127.0.0.1:2', FSMN_MODE: 'ebpf' }, file);
    expect(c.mode).toBe('ebpf');
    expect(c.listen).toBe('127.0.0.1:3');
    expect(c.outboundPort).toBe(16001);
  });

  test('NODE_NAME fills the node; FSMN_FAST_PATH=false turns the fast path off', () => {
    const { node: _n, ...rest } = required;
    const c = loadAgentConfig(rest, { NODE_NAME: 'from-downward-api', FSMN_FAST_PATH: 'false' });
    expect(c.node).toBe('from-downward-api');
    expect(c.fastPath).toBe(false);
  });

  test('errors name the flag, the env variable and the value', () => {
    expect(() => loadAgentConfig({ ...required, mode: 'turbo' }, {})).toThrow(/--mode \/ FSMN_MODE "turbo"/);
    expect(() => loadAgentConfig({ ...required, outboundPort: '70000' }, {})).toThrow(/--outbound-port \/ FSMN_OUTBOUND_PORT "70000"/);
    expect(() => loadAgentConfig({ ...required, listen: 'nowhere' }, {})).toThrow(/--listen.*"nowhere".*HOST:PORT/);
  });

  test('proxy reload: handover by default, signal by FSMN_PROXY_RELOAD or --proxy-reload; drain 10 s, 1..3600', () => {
    expect(loadAgentConfig(required, {})).toMatchObject({ proxyReload: 'handover', proxyDrainSeconds: 10 });
    expect(loadAgentConfig(required, { FSMN_PROXY_RELOAD: 'signal', FSMN_PROXY_DRAIN_SECONDS: '30' })).toMatchObject({ proxyReload: 'signal', proxyDrainSeconds: 30 });
    expect(loadAgentConfig({ ...required, proxyReload: 'handover' }, { FSMN_PROXY_RELOAD: 'signal' }).proxyReload).toBe('handover');
    expect(() => loadAgentConfig({ ...required, proxyReload: 'sighup' }, {})).toThrow(/--proxy-reload \/ FSMN_PROXY_RELOAD "sighup"/);
    expect(() => loadAgentConfig(required, { FSMN_PROXY_DRAIN_SECONDS: '0' })).toThrow(/--proxy-drain-seconds \/ FSMN_PROXY_DRAIN_SECONDS "0"/);
  });

  test('proxy instances: 2 by default, FSMN_PROXY_INSTANCES or --proxy-instances, 1..16', () => {
    expect(loadAgentConfig(required, {}).proxyUser).toBeUndefined();
    expect(proxyRunAs(loadAgentConfig(required, { FSMN_PROXY_USER: '1500' }))).toEqual({ uid: 1500, gid: 1500 });
    expect(proxyRunAs(loadAgentConfig({ ...required, proxyUser: '1500:1600' }, {}))).toEqual({ uid: 1500, gid: 1600 });
    expect(() => loadAgentConfig({ ...required, proxyUser: 'pipy' }, {})).toThrow(/--proxy-user \/ FSMN_PROXY_USER "pipy": expected UID or UID:GID/);
    expect(() => loadAgentConfig({ ...required, proxyUser: '0' }, {})).toThrow(/must not be root \(0\)/);
    expect(loadAgentConfig(required, {}).proxyInstances).toBe(2);
    expect(loadAgentConfig(required, { FSMN_PROXY_INSTANCES: '1' }).proxyInstances).toBe(1);
    expect(loadAgentConfig({ ...required, proxyInstances: '3' }, { FSMN_PROXY_INSTANCES: '1' }).proxyInstances).toBe(3);
    expect(() => loadAgentConfig({ ...required, proxyInstances: '0' }, {})).toThrow(/--proxy-instances \/ FSMN_PROXY_INSTANCES "0"/);
    expect(() => loadAgentConfig(required, { FSMN_PROXY_INSTANCES: 'two' })).toThrow(/--proxy-instances \/ FSMN_PROXY_INSTANCES "two"/);
  });

  test('an unknown key in the file is refused by name', () => {
    const dir = tempDir();
    const file = join(dir, 'agent.yaml');
    writeFileSync(file, 'modee: ebpf\n');
    expect(() => loadAgentConfig(required, {}, file)).toThrow(/modee/);
  });
});
