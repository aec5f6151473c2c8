import { mkdirSync } from 'node:fs';
import type { ClientRequest } from 'node:http';
import { Agent, request } from 'node:https';
import { join } from 'node:path';
import { PolicyClient } from '../src/policy/client.js';
import { DELTA_IM } from '../src/policy/delta.js';
import { desiredState } from '../src/policy/desired.js';

/**
 * The node side of the propagation bench, in a process of its own (forked by
 * bench/propagation.ts): 100 node clients and one real agent client are
 * remote machines in a cluster, so their CPU work must not queue behind, or
 * ahead of, the controller's on one event loop. Talks to the parent over IPC;
 * times are `performance.timeOrigin + now()`, comparable across processes.
 */

export type Transfer = 'delta' | 'full';

export type FleetCommand =
  | { cmd: 'start'; url: string; ca: string; tokens: Record<string, string>; agentNode: string; dir: string }
  | { cmd: 'mode'; transfer: Transfer }
  | { cmd: 'stop' };

export type FleetReport =
  | { type: 'arrival'; node: string; version: string; at: number; bytes: number }
  | { type: 'agent'; version: string; at: number }
  | { type: 'mode'; transfer: Transfer }
  | { type: 'stopped'; agentFetchErrors: number };

export const now = (): number => performance.timeOrigin + performance.now();


/** A minimal node client: long-polls, reports when each version arrived and its size on the wire, does not parse. */
class Poller {
  version = '';
  private transfer: Transfer = 'delta';
  /** The mode of the request parked now. */
  asked: Transfer | undefined;
  private req: ClientRequest | undefined;
  private stopped = false;
  private readonly agent: Agent;

  constructor(
    private readonly url: string,
    readonly node: string,
    private readonly token: string,
    ca: string,
    private readonly arrived: (version: string, bytes: number) => void,
  ) {
    this.agent = new Agent({ keepAlive: true, maxSockets: 1, ca });
  }

  start(): void {
    void this.loop();
  }

  /** Re-park with the new mode: a request parked in the old one would answer the next change in it. */
  switchTo(t: Transfer): void {
    this.transfer = t;
    this.req?.destroy();
  }

  stop(): void {
    this.stopped = true;
    this.agent.destroy();
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      try {
        await this.once();
      } catch {
        if (!this.stopped) await new Promise((r) => setTimeout(r, 10));
      }
    }
  }

  private once(): Promise<void> {
    return new Promise((resolve, reject) => {
      const headers: Record<string, string> = { authorization: `Bearer ${this.token}`, 'accept-encoding': 'gzip' };
      if (this.version) headers['if-none-match'] = `"${this.version}"`;
      if (this.version && this.transfer === 'delta') headers['a-im'] = DELTA_IM;
      this.asked = this.transfer;
      const req = (this.req = request(`${this.url}/v1/nodes/${this.node}/policy?wait=30s`, { agent: this.agent, headers }, (res) => {
        let bytes = 0;
        res.on('data', (c: Buffer) => (bytes += c.length));
        res.on('end', () => {
          if (res.statusCode === 200 || res.statusCode === 226) {
            this.version = String(res.headers.etag).replaceAll('"', '');
            this.arrived(this.version, bytes);
          }
          resolve();
        });
        res.on('error', reject);
      }));
      req.on('error', reject);
      req.end();
    });
  }
}


const send = (r: FleetReport): void => void process.send!(r);

let config: Extract<FleetCommand, { cmd: 'start' }> | undefined;
const pollers: Poller[] = [];
let agent: PolicyClient | undefined;
let agentErrors = 0;
const facts = { proxy: { address: '127.0.0.1', outboundPort: 15001, inboundPort: 15003, cgroupPath: '/' }, nodeAddresses: [], cgroupPathFor: () => '/' };

async function setMode(transfer: Transfer): Promise<void> {
  const c = config!;
  for (const p of pollers) p.switchTo(transfer);
  if (agent) {
    agentErrors += agent.fetchErrors();
    await agent.stop();
  }
  // One agent per mode (the mode is fixed at construction), each with its own last good copy.
  const stateDir = join(c.dir, `agent-${transfer}`);
  mkdirSync(stateDir, { recursive: true });
  agent = new PolicyClient({ url: c.url, node: c.agentNode, ca: c.ca, token: c.tokens[c.agentNode], stateDir, deltas: transfer === 'delta' });
  agent.onChange((e) => {
    desiredState(e.policy, facts);
    send({ type: 'agent', version: e.policy.version, at: now() });
  });
  agent.start();
  while (!pollers.every((p) => p.asked === transfer)) await new Promise((r) => setTimeout(r, 5));
  send({ type: 'mode', transfer });
}

process.on('message', (m: FleetCommand) => {
  if (m.cmd === 'start') {
    config = m;
    for (const [node, token] of Object.entries(m.tokens)) {
      pollers.push(new Poller(m.url, node, token, m.ca, (version, bytes) => send({ type: 'arrival', node, version, at: now(), bytes })));
    }
    pollers.forEach((p) => p.start());
  } else if (m.cmd === 'mode') void setMode(m.transfer);
  else {
    pollers.forEach((p) => p.stop());
    void (async () => {
      if (agent) {
        agentErrors += agent.fetchErrors();
        await agent.stop();
      }
      send({ type: 'stopped', agentFetchErrors: agentErrors });
      process.disconnect();
    })();
  }
});
