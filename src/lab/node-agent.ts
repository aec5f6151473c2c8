import type { AgentConfig } from '../agent/config.js';
import type { TopoNode } from './topology.js';

/**
 * The configuration of an agent that serves one topology node in-process
 * (kernel tests, benchmarks): its dataplane and proxy live in the node's
 * namespace and cgroups, its policy comes from the caller (so the controller
 * fields point nowhere), its API listens on loopback.
 */
export function nodeAgentConfig(node: TopoNode, stateDir: string, overrides: Partial<AgentConfig> = {}): AgentConfig {
  return {
    node: node.name,
    controller: 'https://controller.invalid:15443',
    caFile: '/nonexistent/ca.pem',
    tokenFile: '/nonexistent/token',
    mode: 'auto',
    stateDir,
    bpffsDir: node.bpffsDir,
    podsCgroup: node.podsCgroup,
    proxyCgroup: node.proxyCgroup,
    listen: '127.0.0.1:0',
    netns: node.netns,
    proxy: 'passthrough',
    proxyAddress: node.gateway,
    outboundPort: 15001,
    inboundPort: 15003,
    fastPath: true,
    failurePolicy: 'fail-closed',
    proxyThreadCap: 4,
    nodeAddresses: [node.gateway, node.underlayIp],
    cniSpool: `${stateDir}/cni-spool`,
    cniFailurePolicy: 'auto',
    cniConfDirs: [],
    cniBinDir: '/nonexistent/cni/bin',
    ...overrides,
  };
}
