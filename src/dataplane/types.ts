/**
 * The one interface both interception dataplanes implement (src/dataplane/ebpf,
 * src/dataplane/iptables). The agent renders a DesiredState from the node's
 * policy with a pure function and hands the whole of it to `apply` on every
 * sync: the dataplane diffs it against what is installed (only objects that
 * carry our prefix / live under our pin directory), applies the difference in
 * one transaction, and prunes what is ours but no longer desired.
 */

export type InterceptionMode = 'ebpf' | 'iptables';

/** Exclusions with FSM's annotation semantics (pipy-notes.md, last section). */
export interface Exclusions {
  /** Outbound destination ports never redirected (flomesh.io/outbound-port-exclusion-list). */
  outboundPorts: number[];
  /** Outbound destination CIDRs never redirected (flomesh.io/outbound-ip-range-exclusion-list). */
  outboundCidrs: string[];
  /**
   * When non-empty, only destinations inside these CIDRs are redirected
   * (flomesh.io/outbound-ip-range-inclusion-list); exclusions still win.
   */
  outboundIncludeCidrs: string[];
  /** Inbound ports a strict pod still accepts directly (flomesh.io/inbound-port-exclusion-list). */
  inboundPorts: number[];
}

export const noExclusions = (): Exclusions => ({ outboundPorts: [], outboundCidrs: [], outboundIncludeCidrs: [], inboundPorts: [] });

export interface PodIntercept {
  /** Kubernetes pod uid: the key the dataplane reports pods by. */
  uid: string;
  namespace: string;
  name: string;
  /** The pod's IPv4 address. */
  ip: string;
  /** Absolute path of the pod's cgroup v2 directory (the eBPF dataplane keys pods by its cgroup id). */
  cgroupPath: string;
  /** strict: inbound connections that do not come from a node proxy are refused. */
  inbound: 'strict' | 'permissive';
  /** Per-pod exclusions (from the pod's annotations); merged with the mesh-wide ones. */
  exclusions: Exclusions;
}

export interface ProxyTarget {
  /** Address of the node proxy that the node's pods can reach (IPv4). */
  address: string;
  /** Outbound listener port (FSM: 15001). */
  outboundPort: number;
  /** Inbound listener / node-to-node tunnel port (FSM: 15003). */
  inboundPort: number;
  /** cgroup v2 directory the proxy runs in: its sockets are never intercepted. */
  cgroupPath: string;
  /** In iptables mode the proxy's own traffic is recognised by uid when set. */
  uid?: number;
}

export interface DesiredState {
  proxy: ProxyTarget;
  /** The node's own addresses: connections to them are never redirected. */
  nodeAddresses: string[];
  /** Sources allowed to reach strict pods directly: node proxies (this node's and peers'). */
  proxySources: string[];
  /** Mesh-wide exclusions, applied to every pod in addition to its own. */
  mesh: Exclusions;
  pods: PodIntercept[];
}

export interface ApplyResult {
  /** Whether this sync rewrote everything (first sync, after a failure, periodic repair). */
  full: boolean;
  /** Objects changed by this sync (map entries, rules, set members); 0 for an idempotent sync. */
  changes: number;
  durationMs: number;
}

export interface InstalledState {
  mode: InterceptionMode;
  /** Uids of the pods whose interception is installed. */
  pods: string[];
  /** Free-form, mode-specific detail for `status` (pins, chains, map fill...). */
  detail: Record<string, unknown>;
}

export interface CleanupReport {
  /** Human-readable list of what was removed (pins, links, chains, sets...). */
  removed: string[];
}

export interface Dataplane {
  readonly mode: InterceptionMode;
  /**
   * Make the kernel match `desired`. All or nothing: on failure the previous
   * state stays in force, the error is thrown, and the next apply is full.
   * `full` forces a full rewrite (periodic repair of tampering).
   */
  apply(desired: DesiredState, opts?: { full?: boolean }): Promise<ApplyResult>;
  /** What is installed now, read back from the kernel (not from memory). */
  installed(): Promise<InstalledState>;
  /** Remove everything this dataplane ever installed; nothing of anyone else's. */
  cleanup(): Promise<CleanupReport>;
  /** Release handles; leaves kernel state in place so traffic keeps flowing. */
  close(): Promise<void>;
}
