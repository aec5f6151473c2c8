import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { InvalidInputError } from '../../errors.js';
import { writeFileAtomic } from '../../policy/store.js';
import type { Command } from '../command.js';

/**
 * `fsm-node clusterset`: the certificates a clusterset needs. The CA's key
 * stays where it was made (an operator's machine, not a cluster); each cluster
 * gets its own identity signed by it and the CA certificate, which its
 * ClusterSet file names.
 */
export const clustersetCommand: Command = {
  name: 'clusterset',
  summary: 'make a clusterset CA and the cluster identities signed by it (multi-cluster)',
  usage: ['init-ca --dir DIR', 'issue --cluster ID --ca-dir DIR --out DIR'],
  help: `
init-ca writes DIR/ca.crt and DIR/ca.key (0600): a new clusterset CA. Keep the
key off the clusters; only ca.crt goes to them.
issue writes OUT/cluster.crt (chain) and OUT/cluster.key (0600) for cluster ID:
its controller's identity spiffe://ID.cluster.local/ns/fsm-system/sa/fsm-node-controller,
which peers check on every connection. Copy OUT and DIR/ca.crt to that
cluster and name them in its ClusterSet file (docs/multicluster.md).
issue also writes OUT/mesh-ca/ (ca.crt, ca.key 0600, trust.crt): the cluster's
mesh CA, an intermediate of the clusterset CA limited to ID.cluster.local,
for the built-in identity provider (<state-dir>/mesh-ca/ or the Secret
fsm-node-mesh-ca), so gateways of other clusters trust its workloads; set the
mesh trustDomain to ID.cluster.local.`,
  positionals: true,
  options: {
    dir: { type: 'string', valueName: 'DIR', description: 'init-ca: where the CA is written (must not hold one yet).' },
    cluster: { type: 'string', valueName: 'ID', description: 'issue: the cluster id (a DNS label).' },
    'ca-dir': { type: 'string', valueName: 'DIR', description: 'issue: the directory init-ca wrote.' },
    out: { type: 'string', valueName: 'DIR', description: 'issue: where cluster.crt and cluster.key are written.' },
  },
  async run(values, positionals) {
    const { createClustersetCa, issueClusterIdentity, issueMeshCa } = await import('../../multicluster/identity.js');
    const verb = positionals[0];
    if (verb === 'init-ca') {
      const dir = values.dir;
      if (typeof dir !== 'string') throw new InvalidInputError('--dir', dir, 'is required');
      if (existsSync(join(dir, 'ca.key'))) throw new InvalidInputError('--dir', dir, 'already holds a CA (ca.key): refusing to overwrite it');
      mkdirSync(dir, { recursive: true });
      const ca = await createClustersetCa();
      await writeFileAtomic(join(dir, 'ca.key'), ca.keyPem, 0o600);
      await writeFileAtomic(join(dir, 'ca.crt'), ca.certPem, 0o644);
      process.stdout.write(`clusterset CA written to ${dir}/ca.crt and ${dir}/ca.key\n`);
      return 0;
    }
    if (verb === 'issue') {
      const { cluster, out } = values;
      const caDir = values['ca-dir'];
      if (typeof cluster !== 'string' || !/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/.test(cluster)) throw new InvalidInputError('--cluster', cluster, 'must be a DNS label');
      if (typeof caDir !== 'string') throw new InvalidInputError('--ca-dir', caDir, 'is required');
      if (typeof out !== 'string') throw new InvalidInputError('--out', out, 'is required');
      const read = (f: string) => {
        try {
          return readFileSync(join(caDir, f), 'utf8');
        } catch (err) {
          throw new InvalidInputError('--ca-dir', caDir, `cannot read ${f}: ${(err as Error).message}`);
        }
      };
      const id = await issueClusterIdentity({ certPem: read('ca.crt'), keyPem: read('ca.key') }, cluster);
      mkdirSync(out, { recursive: true });
      await writeFileAtomic(join(out, 'cluster.key'), id.keyPem, 0o600);
      await writeFileAtomic(join(out, 'cluster.crt'), id.certPem, 0o644);
      const meshCa = await issueMeshCa({ certPem: read('ca.crt'), keyPem: read('ca.key') }, cluster);
      mkdirSync(join(out, 'mesh-ca'), { recursive: true });
      await writeFileAtomic(join(out, 'mesh-ca', 'ca.key'), meshCa.keyPem, 0o600);
      await writeFileAtomic(join(out, 'mesh-ca', 'ca.crt'), meshCa.certPem, 0o644);
      await writeFileAtomic(join(out, 'mesh-ca', 'trust.crt'), read('ca.crt'), 0o644);
      process.stdout.write(`identity of cluster ${cluster} written to ${out}/cluster.crt and ${out}/cluster.key; its mesh CA to ${out}/mesh-ca/\n`);
      return 0;
    }
    throw new InvalidInputError('clusterset', verb, 'expected init-ca or issue');
  },
};
