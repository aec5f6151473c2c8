import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { generateTokens, TokenFileAuthenticator, writeTokensFile } from '../../src/controller/auth.js';
import { generateTls, type TlsMaterial } from '../../src/controller/certs.js';
import { PolicyHub } from '../../src/controller/hub.js';
import type { IdentityService } from '../../src/controller/identities.js';
import { buildPolicyServer } from '../../src/controller/server.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import type { Kind } from '../../src/policy/objects.js';
import type { Obj } from './policy-fixtures.js';

/**
 * A real policy server over HTTPS for the unit tier: a fresh CA and serving
 * certificate, per-node tokens for node-a and node-b in a temporary
 * directory, a compiler and a hub. The caller listens and closes.
 */
export interface PolicyServerFixture {
  tls: TlsMaterial;
  dir: string;
  tokens: Record<string, string>;
  compiler: PolicyCompiler;
  hub: PolicyHub;
  server: FastifyInstance;
  /** Upsert objects and publish what the compile changed. */
  publish(...objs: Obj[]): void;
  close(): Promise<void>;
}

export async function policyServerFixture(dirPrefix: string, o: { identities?: (compiler: PolicyCompiler) => IdentityService } = {}): Promise<PolicyServerFixture> {
  const tls = await generateTls(['localhost', '127.0.0.1']);
  const dir = mkdtempSync(join(tmpdir(), dirPrefix));
  const tokens = generateTokens(['node-a', 'node-b']);
  await writeTokensFile(join(dir, 'tokens.json'), tokens);
  const compiler = new PolicyCompiler();
  const hub = new PolicyHub((n) => compiler.get(n));
  const server = buildPolicyServer({ hub, auth: new TokenFileAuthenticator(join(dir, 'tokens.json')), tls, identities: o.identities?.(compiler) });
  return {
    tls,
    dir,
    tokens,
    compiler,
    hub,
    server,
    publish(...objs) {
      for (const o of objs) compiler.upsert(o.kind as Kind, o);
      hub.publish(compiler.compile().changed);
    },
    async close() {
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
