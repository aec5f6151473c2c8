import { readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import { desiredModes, modeLabel } from '../../agent/mode.js';
import { FsmNodeError, InvalidInputError, errorMessage } from '../../errors.js';
import { labFiles, readLabState, resolveLabDir } from '../../lab/state.js';
import { oneOf, type Command } from '../command.js';

/** The running lab, if any: `mode` then needs neither --agent nor --manifests. */
function runningLab(): { manifests: string; agentOf(node: string): string } | undefined {
  const dir = resolveLabDir(undefined);
  const state = readLabState(dir);
  if (!state) return undefined;
  return {
    manifests: labFiles(dir).manifests,
    agentOf(node) {
      const n = state.nodes.find((x) => x.name === node);
      if (!n) throw new InvalidInputError('--node', node, `not a node of the lab (${state.nodes.map((x) => x.name).join(', ')})`);
      return n.agentUrl;
    },
  };
}

/** yaml is loaded on use: this module is part of the CLI every agent process loads. */
const yaml = (): typeof import('yaml') => createRequire(import.meta.url)('yaml') as typeof import('yaml');

/**
 * Set the Node label in a manifest directory (the lab's controller source):
 * the same path a label patch takes in a cluster — controller, policy, agent.
 * Returns the file changed.
 */
export function setModeInManifests(dir: string, node: string, mode: string): string {
  for (const file of readdirSync(dir).filter((f) => /\.ya?ml$/.test(f)).sort()) {
    const path = join(dir, file);
    const docs = yaml().parseAllDocuments(readFileSync(path, 'utf8'));
    const hit = docs.find((d) => d.get('kind') === 'Node' && d.getIn(['metadata', 'name']) === node);
    if (!hit) continue;
    hit.setIn(['metadata', 'labels', modeLabel], mode);
    const tmp = `${path}.tmp`;
    writeFileSync(tmp, docs.map((d) => d.toString()).join(''));
    renameSync(tmp, path);
    return path;
  }
  throw new InvalidInputError('--node', node, `no Node manifest with that name in ${dir}`);
}

async function patchNodeLabel(kubeconfig: string | undefined, node: string, mode: string): Promise<void> {
  const k8s = await import('@kubernetes/client-node');
  const kc = new k8s.KubeConfig();
  if (kubeconfig) kc.loadFromFile(kubeconfig);
  else kc.loadFromDefault();
  const api = kc.makeApiClient(k8s.CoreV1Api);
  await api.patchNode({ name: node, body: { metadata: { labels: { [modeLabel]: mode } } } }, k8s.setHeaderOptions('Content-Type', k8s.PatchStrategy.MergePatch));
}

export const modeCommand: Command = {
  name: 'mode',
  summary: "get or set a node's interception mode (ebpf, iptables or auto)",
  usage: ['get [--node NAME | --agent URL]', 'set ebpf|iptables|auto --node NAME [--kubeconfig PATH | --manifests DIR]'],
  help: `
\`set\` writes the Node label ${modeLabel}: with --kubeconfig (or the default
kubeconfig) it patches the Node in the cluster; with --manifests it edits the
Node in a manifest directory (the lab: \`--manifests <lab dir>/manifests\`).
The controller passes the label to the node's agent, which switches live,
make-before-break: the new mode is installed and verified before the old one
is removed; new connections do not fail during the switch.
\`get\` asks the node's agent for the desired and effective mode and the reason
for any fallback. While a lab runs, --node names a lab node: \`get\` asks that
node's agent and \`set\` edits the lab's manifests, no other flag needed.`,
  options: {
    node: { type: 'string', valueName: 'NAME', description: 'Node to set.' },
    kubeconfig: { type: 'string', valueName: 'PATH', description: 'Cluster to patch (default: the default kubeconfig).' },
    manifests: { type: 'string', valueName: 'DIR', description: 'Edit the Node in this manifest directory instead of a cluster.' },
    agent: { type: 'string', valueName: 'URL', description: 'Agent to ask (get; default: the lab node named by --node, else http://127.0.0.1:15900).' },
  },
  positionals: true,
  async run(values, positionals) {
    const verb = oneOf('verb', positionals[0], ['get', 'set'] as const);
    if (verb === 'get') {
      const lab = typeof values.agent === 'string' || typeof values.node !== 'string' ? undefined : runningLab();
      const base = typeof values.agent === 'string' ? values.agent : lab && typeof values.node === 'string' ? lab.agentOf(values.node) : 'http://127.0.0.1:15900';
      const url = `${base.replace(/\/$/, '')}/v1/state`;
      let state: { node?: string; mode?: Record<string, unknown> };
      try {
        state = (await (await fetch(url, { signal: AbortSignal.timeout(3000) })).json()) as typeof state;
      } catch (err) {
        throw new FsmNodeError('FSMN_ERR_NO_AGENT', `no agent answered at ${url} (${errorMessage(err)})`);
      }
      console.log(JSON.stringify({ node: state.node, ...state.mode }, null, 2));
      return 0;
    }
    const mode = oneOf('mode', positionals[1], desiredModes);
    if (typeof values.node !== 'string') throw new InvalidInputError('--node', values.node, 'required for mode set');
    const manifests = typeof values.manifests === 'string' ? values.manifests : values.kubeconfig === undefined ? runningLab()?.manifests : undefined;
    if (manifests !== undefined) {
      const file = setModeInManifests(manifests, values.node, mode);
      console.log(`set ${modeLabel}=${mode} on Node ${values.node} in ${file}`);
    } else {
      await patchNodeLabel(values.kubeconfig as string | undefined, values.node, mode);
      console.log(`patched Node ${values.node}: ${modeLabel}=${mode}`);
    }
    return 0;
  },
};
