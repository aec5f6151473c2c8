// `node --import ./test/support/ts-register.mjs file.ts` runs our TypeScript
// sources directly (transpile only, see ts-hooks.mjs): how tests start child
// processes (the passthrough proxy, an agent-like dataplane holder) from the
// sources under test rather than from a possibly stale dist/.
import { register } from 'node:module';

register('./ts-hooks.mjs', import.meta.url);
