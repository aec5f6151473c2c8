import type { InterceptionMode } from '../dataplane/types.js';
import { InvalidInputError } from '../errors.js';

/**
 * Which interception mode a node runs, and why. Pure: the inputs are the
 * desired mode from its three sources, what the probe found, and what this
 * node chose last time (persisted in the agent's state directory).
 *
 * Precedence of the desired mode: the Node's label flomesh.io/interception-mode,
 * then the mesh default from the controller's policy, then the agent's flag.
 * `auto` prefers eBPF where the probe allows it. A desired mode the node cannot
 * run falls back to the other one with a reason naming what is missing; when
 * neither works the node is not ready and says why — never silently unmeshed.
 */
export type DesiredMode = InterceptionMode | 'auto';
export const desiredModes: readonly DesiredMode[] = ['ebpf', 'iptables', 'auto'];
export const modeLabel = 'flomesh.io/interception-mode';

export interface ModeSupport {
  /** Undefined when the mode works on this node, else what is missing. */
  ebpf?: string;
  iptables?: string;
}

export interface ModeInputs {
  nodeLabel?: string | undefined;
  meshDefault?: string | undefined;
  flag: string;
}

export interface PersistedMode {
  /** The desired mode (after precedence) the choice was made for. */
  desired: DesiredMode;
  effective: InterceptionMode;
}

export type ModeDecision =
  | { ready: true; desired: DesiredMode; desiredSource: 'node-label' | 'mesh-default' | 'agent-flag'; effective: InterceptionMode; fallbackReason?: string }
  | { ready: false; desired: DesiredMode; desiredSource: 'node-label' | 'mesh-default' | 'agent-flag'; reason: string };

export function parseDesiredMode(field: string, value: string): DesiredMode {
  if ((desiredModes as readonly string[]).includes(value)) return value as DesiredMode;
  throw new InvalidInputError(field, value, `allowed: ${desiredModes.join(', ')}`);
}

export function desiredMode(inputs: ModeInputs): { desired: DesiredMode; source: 'node-label' | 'mesh-default' | 'agent-flag' } {
  if (inputs.nodeLabel !== undefined && inputs.nodeLabel !== '') return { desired: parseDesiredMode(`Node label ${modeLabel}`, inputs.nodeLabel), source: 'node-label' };
  if (inputs.meshDefault !== undefined && inputs.meshDefault !== '') return { desired: parseDesiredMode('mesh interceptionMode', inputs.meshDefault), source: 'mesh-default' };
  return { desired: parseDesiredMode('--mode', inputs.flag), source: 'agent-flag' };
}

export function chooseMode(inputs: ModeInputs, support: ModeSupport, persisted?: PersistedMode): ModeDecision {
  const { desired, source } = desiredMode(inputs);
  const works = (m: InterceptionMode) => support[m] === undefined;

  // Same inputs as last time and that mode still works: keep it, never flip on restart.
  if (persisted && persisted.desired === desired && works(persisted.effective)) {
    const fallbackReason = desired !== 'auto' && persisted.effective !== desired ? support[desired] : undefined;
    return { ready: true, desired, desiredSource: source, effective: persisted.effective, ...(fallbackReason ? { fallbackReason: `${desired} unavailable: ${fallbackReason}` } : {}) };
  }
  const preferred: InterceptionMode = desired === 'auto' ? 'ebpf' : desired;
  const other: InterceptionMode = preferred === 'ebpf' ? 'iptables' : 'ebpf';
  if (works(preferred)) return { ready: true, desired, desiredSource: source, effective: preferred };
  if (works(other)) {
    return { ready: true, desired, desiredSource: source, effective: other, fallbackReason: `${preferred} unavailable: ${support[preferred]}` };
  }
  return { ready: false, desired, desiredSource: source, reason: `no interception mode works: ebpf: ${support.ebpf}; iptables: ${support.iptables}` };
}
