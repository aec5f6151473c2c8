import { DEFAULT_CONTROLLER_NAMESPACE } from '../policy/fsm.js';

/**
 * The controller's defaults, apart from its implementation so the CLI can
 * show them in --help without loading the Kubernetes client (about 70 MiB of
 * RSS the node agent, which shares the CLI, must not pay).
 */
export const DEFAULT_LISTEN = '0.0.0.0:15443';
export const DEFAULT_STATE_DIR = '/var/lib/fsm-node-controller';
export const DEFAULT_AGENT_SERVICE_ACCOUNT = `${DEFAULT_CONTROLLER_NAMESPACE}:fsm-node-agent`;
export const CONTROLLER_SERVICE = 'fsm-node-controller';
