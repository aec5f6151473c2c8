import { NotImplementedError } from '../../errors.js';
import type { Command } from '../command.js';

export const controllerCommand: Command = {
  name: 'controller',
  summary: 'run the policy controller: watch Kubernetes or a manifest directory, serve per-node policy',
  usage: ['--manifests DIR [options]', '--kubeconfig PATH | --in-cluster [options]'],
  help: `
Compiles the mesh (monitored namespaces, pods, services, endpoint slices, SMI
TrafficSplit / TrafficTarget / HTTPRouteGroup / TCPRoute, mesh config) into
one policy per node and serves it to the agents over HTTPS with a versioned
long-poll. Each agent can read only its own node's policy.`,
  options: {
    manifests: { type: 'string', valueName: 'DIR', description: 'Directory of Kubernetes YAML manifests to serve (watched; the lab uses this).' },
    kubeconfig: { type: 'string', valueName: 'PATH', description: 'Watch the cluster named by this kubeconfig.' },
    'in-cluster': { type: 'boolean', description: "Watch the cluster using the pod's ServiceAccount." },
    listen: { type: 'string', valueName: 'HOST:PORT', default: '0.0.0.0:15443', description: 'HTTPS listen address for agents.' },
    'state-dir': { type: 'string', valueName: 'DIR', default: '/var/lib/fsm-node-controller', description: 'Where the CA, serving certificate and tokens are kept (lab mode).' },
  },
  async run() {
    throw new NotImplementedError('fsm-node controller');
  },
};
