import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createCgroup, killCgroupTree, removeCgroupTree } from '../util/cgroup.js';
import { run } from '../util/exec.js';
import { packageRoot } from '../util/paths.js';
import { startDetached } from './processes.js';
import type { LabProcess } from './state.js';
import { underlayAddress, underlayNetnsName } from './topology.js';

/**
 * The lab's outside world (issue 20): what sits on the site's network but
 * off the mesh.
 *
 *   outside client  <prefix>-oc  10.B.0.200  a device, a till, a vehicle: it
 *                                             calls the nodes' Gateway listeners (ingress)
 *   outside server  <prefix>-os  10.B.0.201  an external system: plain HTTP :80 and TLS :443
 *                                             (names outside.lab and its address), that pods call (egress)
 *
 * Both hang off the underlay bridge like the nodes, with a route to the pod
 * subnets through the underlay. Their namespaces and cgroup carry the lab
 * prefix, so `lab down`'s sweep removes them whatever happened.
 */

export const OUTSIDE_CLIENT_HOST = 200;
export const OUTSIDE_SERVER_HOST = 201;
export const OUTSIDE_HTTP_PORT = 80;
export const OUTSIDE_HTTPS_PORT = 443;
export const OUTSIDE_SERVER_NAME = 'outside.lab';

export interface LabOutside {
  client: { netns: string; ip: string };
  server: { netns: string; ip: string; httpPort: number; httpsPort: number; serverName: string; caFile: string; process?: LabProcess | undefined };
  cgroup: string;
}

/** `ip -batch` lines for one outside namespace's leg (pure). */
export function renderOutsideIpBatch(ip: string, subnetBase: number): string[] {
  return ['link set lo up', 'link set eth0 up', `addr add ${ip}/24 dev eth0`, `route add 10.${subnetBase}.0.0/16 via ${underlayAddress(subnetBase, 254)} dev eth0`];
}

async function ipBatch(netns: string, lines: string[]): Promise<void> {
  await run('ip', ['-n', netns, '-batch', '-'], { input: `${lines.join('\n')}\n` });
}

async function addHost(prefix: string, subnetBase: number, suffix: string, host: number): Promise<{ netns: string; ip: string }> {
  const netns = `${prefix}-${suffix}`;
  const ul = underlayNetnsName(prefix);
  const ip = underlayAddress(subnetBase, host);
  await run('ip', ['netns', 'add', netns]);
  await run('ip', ['-n', ul, 'link', 'add', suffix, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', netns]);
  await ipBatch(ul, [`link set ${suffix} master br0`, `link set ${suffix} up`]);
  await ipBatch(netns, renderOutsideIpBatch(ip, subnetBase));
  return { netns, ip };
}

/** A CA and a server certificate for outside.lab and the server's address (openssl, as the controller's CA). */
async function serverCertificate(dir: string, ip: string): Promise<{ caFile: string; certFile: string; keyFile: string }> {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const f = (n: string) => join(dir, n);
  const curve = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  await run('openssl', ['req', '-x509', ...curve, '-keyout', f('ca.key'), '-out', f('ca.crt'), '-subj', '/CN=fsm-node lab outside CA', '-days', '30']);
  await run('openssl', ['req', '-new', ...curve, '-keyout', f('server.key'), '-out', f('server.csr'), '-subj', `/CN=${OUTSIDE_SERVER_NAME}`]);
  writeFileSync(f('ext'), `subjectAltName=DNS:${OUTSIDE_SERVER_NAME},IP:${ip}\n`);
  await run('openssl', ['x509', '-req', '-in', f('server.csr'), '-CA', f('ca.crt'), '-CAkey', f('ca.key'), '-CAcreateserial', '-days', '30', '-extfile', f('ext'), '-out', f('server.crt')]);
  return { caFile: f('ca.crt'), certFile: f('server.crt'), keyFile: f('server.key') };
}

/**
 * Build the outside client and server on an existing topology's underlay and
 * start the server (HTTP and TLS). `dir` holds its certificate and log.
 */
export async function createOutside(o: {
  prefix: string;
  subnetBase: number;
  cgroupRoot: string;
  dir: string;
  /** How to run outside-server (default the built dist/src/lab/outside-server.js; tests run the TypeScript). */
  serverCommand?: string[];
}): Promise<LabOutside> {
  const client = await addHost(o.prefix, o.subnetBase, 'oc', OUTSIDE_CLIENT_HOST);
  const server = await addHost(o.prefix, o.subnetBase, 'os', OUTSIDE_SERVER_HOST);
  const cgroup = join(o.cgroupRoot, `${o.prefix}-outside`);
  await createCgroup(cgroup);
  const tls = await serverCertificate(join(o.dir, 'outside'), server.ip);
  const command = o.serverCommand ?? [globalThis.process.execPath, join(packageRoot(), 'dist', 'src', 'lab', 'outside-server.js')];
  const process = startDetached(
    cgroup,
    server.netns,
    [...command, '--name', OUTSIDE_SERVER_NAME, '--http', String(OUTSIDE_HTTP_PORT), '--https', String(OUTSIDE_HTTPS_PORT), '--cert', tls.certFile, '--key', tls.keyFile],
    join(o.dir, 'outside-server.log'),
  );
  return { client, server: { ...server, httpPort: OUTSIDE_HTTP_PORT, httpsPort: OUTSIDE_HTTPS_PORT, serverName: OUTSIDE_SERVER_NAME, caFile: tls.caFile, process }, cgroup };
}

/** Stop the outside server and remove both namespaces and the cgroup (tests; `lab down` sweeps them by prefix). */
export async function destroyOutside(o: LabOutside): Promise<void> {
  await killCgroupTree(o.cgroup).catch(() => undefined);
  await removeCgroupTree(o.cgroup).catch(() => undefined);
  for (const ns of [o.client.netns, o.server.netns]) await run('ip', ['netns', 'del', ns], { allowFail: true });
}
