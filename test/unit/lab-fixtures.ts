import { parseAllDocuments } from 'yaml';
import type { ManifestInput } from '../../src/lab/manifests.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import type { Kind } from '../../src/policy/objects.js';

/** The lab's default shape for unit tests of src/lab: two nodes, two pods each (v1 and v2 of echo). */
export const labInput: ManifestInput = {
  mode: 'ebpf',
  nodes: [
    { name: 'n1', address: '10.78.0.1' },
    { name: 'n2', address: '10.78.0.2' },
  ],
  pods: [
    { name: 'p1', node: 'n1', ip: '10.77.1.2', cgroupPath: '/cg/fsmlab-n1/pods/p1', version: 'v1' },
    { name: 'p2', node: 'n1', ip: '10.77.1.3', cgroupPath: '/cg/fsmlab-n1/pods/p2', version: 'v2' },
    { name: 'p3', node: 'n2', ip: '10.77.2.2', cgroupPath: '/cg/fsmlab-n2/pods/p3', version: 'v1' },
    { name: 'p4', node: 'n2', ip: '10.77.2.3', cgroupPath: '/cg/fsmlab-n2/pods/p4', version: 'v2' },
  ],
};

/** Rendered manifest files (name -> YAML) through the controller's compiler, as the lab's controller reads them. */
export function compileFiles(files: Map<string, string>): PolicyCompiler {
  const compiler = new PolicyCompiler();
  for (const [name, text] of files) {
    parseAllDocuments(text).forEach((d, i) => {
      const obj = d.toJS() as { kind: Kind };
      compiler.upsert(obj.kind, obj, `${name}#${i}`);
    });
  }
  compiler.compile();
  return compiler;
}
