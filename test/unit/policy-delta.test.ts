import type { CompiledNode, Keyed } from '../../src/policy/compiler.js';
import { applyDelta, DeltaError, deltaPieces, diffKeyed } from '../../src/policy/delta.js';
import { NodePolicyDeltaSchema, NodePolicySchema, type NodePolicy, type NodePolicyDelta } from '../../src/policy/schema.js';
import { applyStep, baseMesh, changeSteps as steps, compiled, pod, slice } from './policy-fixtures.js';

/** The delta from `from` to `to` as a client reads it off the wire: the encoded pieces, parsed, through the schema. */
function wireDelta(from: CompiledNode, to: CompiledNode): NodePolicyDelta {
  const [shared, tail] = deltaPieces(from, to);
  return NodePolicyDeltaSchema.parse(JSON.parse(`{${shared.text()}${tail}`));
}

/** The full policy as a client reads it off the wire. */
const wireFull = (c: CompiledNode): NodePolicy => NodePolicySchema.parse(JSON.parse(c.json()));

describe('policy deltas', () => {
  test('applied to the policy held, every delta gives exactly the full policy of the new version', () => {
    const c = compiled(baseMesh());
    let held = new Map(c.nodes().map((n) => [n, c.get(n)!]));
    let deltas = 0;
    for (const [what, change] of steps) {
      applyStep(c, change);
      const { changed } = c.compile();
      expect({ what, changed: changed.length > 0 }).toEqual({ what, changed: true });
      for (const node of changed) {
        const from = held.get(node);
        const to = c.get(node);
        if (!from || !to) continue; // a new node gets the full policy; a gone one nothing
        const applied = applyDelta(wireFull(from), wireDelta(from, to));
        expect({ what, node, policy: applied }).toEqual({ what, node, policy: wireFull(to) });
        deltas++;
      }
      held = new Map(c.nodes().map((n) => [n, c.get(n)!]));
    }
    expect(deltas).toBeGreaterThan(steps.length);
  });

  test('a trust bundle change reaches every node as a delta carrying the trust part; a policy without trust still parses', () => {
    const c = compiled(baseMesh());
    const before = c.get('node-a')!;
    expect(before.policy.trust).toEqual({ trustDomain: 'cluster.local', bundle: [] });
    c.setTrustBundle(['old root', 'new root']);
    expect(c.compile().changed.sort()).toEqual(['node-a', 'node-b']);
    const d = wireDelta(before, c.get('node-a')!);
    expect(d.trust).toEqual({ trustDomain: 'cluster.local', bundle: ['old root', 'new root'] });
    expect(d.pods).toBeUndefined();
    const { trust: _t, ...older } = wireFull(before);
    expect(NodePolicySchema.parse(older).trust).toBeUndefined();
    expect(applyDelta(older, d).trust).toEqual(d.trust);
    c.setTrustBundle(['old root', 'new root']);
    expect(c.compile().changed).toEqual([]);
  });

  test('a delta carries only what changed: a pod on node-b gives node-a its node-b slice and nothing else', () => {
    const c = compiled(baseMesh());
    const before = c.get('node-a')!;
    c.upsert('Pod', pod('api-2', { ip: '10.0.1.2', node: 'node-b', sa: 'api' }));
    c.compile();
    const d = wireDelta(before, c.get('node-a')!);
    expect(Object.keys(d).sort()).toEqual(['apiVersion', 'base', 'counts', 'kind', 'meshPods', 'version']);
    expect(d.meshPods).toEqual({
      set: {
        'node-b': [
          { ip: '10.0.1.1', namespace: 'app', serviceAccount: 'api', node: 'node-b' },
          { ip: '10.0.1.2', namespace: 'app', serviceAccount: 'api', node: 'node-b' },
        ],
      },
      remove: [],
    });
    expect(d.counts).toEqual({ services: 3, splits: 0, meshPods: 4 });
  });

  test('node-b’s own delta also carries its node part', () => {
    const c = compiled(baseMesh());
    const before = c.get('node-b')!;
    c.upsert('Pod', pod('api-2', { ip: '10.0.1.2', node: 'node-b', sa: 'api' }));
    c.compile();
    const d = wireDelta(before, c.get('node-b')!);
    expect(d.pods?.map((p) => p.name)).toEqual(['api-1', 'api-2']);
    expect(d.node?.name).toBe('node-b');
    expect(d.mesh).toBeUndefined();
  });

  describe('a delta that does not fit the policy held is refused, naming why', () => {
    const c = compiled(baseMesh());
    const from = c.get('node-a')!;
    c.upsert('EndpointSlice', slice('api', [{ ip: '10.0.1.1', node: 'node-b', pod: 'api-1' }], { port: 9090 }));
    c.compile();
    const delta = wireDelta(from, c.get('node-a')!);
    const held = wireFull(from);

    const refusal = (h: NodePolicy, d: NodePolicyDelta): DeltaError => {
      try {
        applyDelta(h, d);
      } catch (err) {
        if (err instanceof DeltaError) return err;
        throw err;
      }
      throw new Error('applied');
    };

    test('another base version', () => {
      expect(refusal({ ...held, version: 'ffffffffffffffff' }, delta).field).toBe('base');
    });
    test('a held policy that has drifted (counts differ)', () => {
      // web is not in the delta (only api changed): its loss on the client shows in the counts.
      const err = refusal({ ...held, services: held.services.filter((s) => s.name !== 'web') }, delta);
      expect(err.field).toBe('counts.services');
      expect(err.message).toMatch(/has 2, the controller has 3/);
    });
    test('a removal of something the policy held does not have', () => {
      expect(refusal(held, { ...delta, services: { set: [], remove: ['app/nope'] } }).field).toBe('services.remove');
      expect(refusal(held, { ...delta, meshPods: { set: {}, remove: ['node-z'] } }).field).toBe('meshPods.remove');
    });
    test('a mesh pods slice holding a pod of another node', () => {
      const stray = { ip: '10.0.0.1', namespace: 'app', serviceAccount: 'web', node: 'node-a' };
      expect(refusal(held, { ...delta, meshPods: { set: { 'node-b': [stray] }, remove: [] } }).field).toBe('meshPods.set.node-b');
    });
    test('the policy held is not changed by applying', () => {
      const copy = structuredClone(held);
      applyDelta(held, delta);
      expect(held).toEqual(copy);
    });
  });

  test('diffKeyed walks two sorted lists once: set for new or changed, remove for gone', () => {
    const k = (key: string, hash: string): Keyed => ({ key, hash, json: '' });
    const from = [k('a', '1'), k('b', '1'), k('d', '1')];
    const to = [k('b', '2'), k('c', '1'), k('d', '1'), k('e', '1')];
    const d = diffKeyed(from, to)!;
    expect(d.set.map((x) => x.key)).toEqual(['b', 'c', 'e']);
    expect(d.remove).toEqual(['a']);
    expect(diffKeyed(from, [...from])).toBeUndefined();
    expect(diffKeyed(from, from)).toBeUndefined();
    expect(diffKeyed([], to)!.set).toHaveLength(4);
    expect(diffKeyed(from, [])!.remove).toEqual(['a', 'b', 'd']);
  });
});
