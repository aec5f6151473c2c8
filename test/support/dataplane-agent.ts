import { readFileSync } from 'node:fs';
import type { DesiredState, InterceptionMode } from '../../src/dataplane/types.js';
import { errorMessage } from '../../src/errors.js';
import { dataplaneModes, type DataplaneOptions, type NodeSpec } from './dataplanes.js';

/**
 * An agent-like process for the conformance suite: builds the dataplane of a
 * mode for one node, applies the desired state read from a JSON file, prints
 * one JSON line {"event":"applied", result, installed}, and stays up until
 * SIGTERM (close, leave the kernel state) or SIGKILL (what the suite does to
 * show traffic survives the agent).
 *
 *   node --import test/support/ts-register.mjs test/support/dataplane-agent.ts MODE NODE_JSON DESIRED_FILE [OPTIONS_JSON]
 */
async function main([mode, nodeJson, desiredFile, optsJson]: string[]): Promise<void> {
  const factory = dataplaneModes[mode as InterceptionMode];
  if (factory === undefined || nodeJson === undefined || desiredFile === undefined) throw new Error(`usage: dataplane-agent MODE NODE_JSON DESIRED_FILE [OPTIONS_JSON] (mode ${mode})`);
  const dp = factory.create(JSON.parse(nodeJson) as NodeSpec, optsJson === undefined ? {} : (JSON.parse(optsJson) as DataplaneOptions));
  const result = await dp.apply(JSON.parse(readFileSync(desiredFile, 'utf8')) as DesiredState);
  const installed = await dp.installed();
  process.stdout.write(`${JSON.stringify({ event: 'applied', result, installed })}\n`);
  const keepAlive = setInterval(() => {}, 1 << 30);
  process.once('SIGTERM', () => {
    clearInterval(keepAlive);
    void dp.close().then(() => process.exit(0));
  });
}

main(process.argv.slice(2)).catch((err: unknown) => {
  process.stderr.write(`dataplane-agent: ${errorMessage(err)}\n`);
  process.exit(2);
});
