import { FieldError } from '../../src/policy/fields.js';
import { toRecord } from '../../src/policy/objects.js';
import { MAX_WEIGHT, parseSplitSpec, quantityMilli, SPLIT_API_VERSIONS } from '../../src/policy/smi-split.js';

/** Every SMI TrafficSplit version into one record; every bad field named with its value. */

const ts = (apiVersion: string, spec: unknown) => ({ apiVersion, kind: 'TrafficSplit', metadata: { name: 's', namespace: 'app' }, spec });
const fieldError = (f: () => unknown): { field: string; message: string } => {
  try {
    f();
  } catch (err) {
    if (err instanceof FieldError) return { field: err.field, message: err.message };
    throw err;
  }
  throw new Error('accepted');
};

describe('each version reads into the same record', () => {
  test('v1alpha1: quantity weights become the same ratios in small whole numbers', () => {
    const rec = toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha1', { service: 'web', backends: [{ service: 'v1', weight: '900m' }, { service: 'v2', weight: '100m' }] }));
    expect(rec).toEqual({ namespace: 'app', name: 's', service: 'web', backends: [{ service: 'v1', weight: 9 }, { service: 'v2', weight: 1 }], matchGroups: [] });
    const weights = (...w: unknown[]) => parseSplitSpec('split.smi-spec.io/v1alpha1', { service: 'web', backends: w.map((weight, i) => ({ service: `b${i}`, weight })) }).backends.map((b) => b.weight);
    expect(weights('500m', '500m')).toEqual([1, 1]);
    expect(weights(1, '500m')).toEqual([2, 1]); // a number is a quantity too: 1 = 1000m
    expect(weights('1', '0.25')).toEqual([4, 1]);
    expect(weights('1k', 1)).toEqual([1000, 1]);
    expect(weights('1Ki', '1k')).toEqual([128, 125]);
    expect(weights('2e2', 100)).toEqual([2, 1]);
    expect(weights(0, '1')).toEqual([0, 1]);
  });

  test('v1alpha2: whole numbers, as written', () => {
    const rec = toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha2', { service: 'web', backends: [{ service: 'v1', weight: 80 }, { service: 'v2', weight: 20 }] }));
    expect(rec).toEqual({ namespace: 'app', name: 's', service: 'web', backends: [{ service: 'v1', weight: 80 }, { service: 'v2', weight: 20 }], matchGroups: [] });
  });

  test('v1alpha3: matches name HTTPRouteGroups (kind and name)', () => {
    const rec = toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha3', { service: 'web', matches: [{ kind: 'HTTPRouteGroup', name: 'canary' }], backends: [{ service: 'v2', weight: 100 }] }));
    expect(rec).toEqual({ namespace: 'app', name: 's', service: 'web', backends: [{ service: 'v2', weight: 100 }], matchGroups: ['canary'] });
  });

  test('v1alpha4: matches are typed local references; apiGroup may be given or left out (CRDs that prune it)', () => {
    const spec = {
      service: 'web',
      matches: [{ apiGroup: 'specs.smi-spec.io', kind: 'HTTPRouteGroup', name: 'canary' }, { kind: 'HTTPRouteGroup', name: 'firefox' }],
      backends: [{ service: 'v1', weight: 0 }, { service: 'v2', weight: 100 }],
    };
    expect(toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha4', spec))).toEqual({
      namespace: 'app',
      name: 's',
      service: 'web',
      backends: [{ service: 'v1', weight: 0 }, { service: 'v2', weight: 100 }],
      matchGroups: ['canary', 'firefox'],
    });
    expect(toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha4', { ...spec, matches: [] })).matchGroups).toEqual([]);
  });

  test('a v1alpha1 split served under v1alpha4 (the CRDs convert nothing) keeps its quantity weights', () => {
    const rec = toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha4', { service: 'web', backends: [{ service: 'v1', weight: '750m' }, { service: 'v2', weight: '250m' }] }));
    expect(rec.backends).toEqual([{ service: 'v1', weight: 3 }, { service: 'v2', weight: 1 }]);
  });

  test('an object without apiVersion (as some Kubernetes lists give items) is read as the watched version', () => {
    const o = ts('x', { service: 'web', matches: [{ kind: 'HTTPRouteGroup', name: 'g' }], backends: [{ service: 'v1', weight: 1 }] }) as Record<string, unknown>;
    delete o.apiVersion;
    expect(toRecord('TrafficSplit', o).matchGroups).toEqual(['g']);
    expect(SPLIT_API_VERSIONS[0]).toBe('split.smi-spec.io/v1alpha4');
  });
});

describe('bad fields are named with their value', () => {
  const v4 = (spec: unknown) => () => toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha4', spec));
  const good = { service: 'web', backends: [{ service: 'v1', weight: 1 }] };

  test.each([
    ['unknown version', () => toRecord('TrafficSplit', ts('split.smi-spec.io/v1beta1', good)), 'apiVersion', '"split.smi-spec.io/v1beta1"'],
    ['no spec', v4(undefined), 'spec', 'undefined'],
    ['root not a name', v4({ ...good, service: 'other/web' }), 'spec.service', '"other/web"'],
    ['no backends', v4({ service: 'web', backends: [] }), 'spec.backends', '[]'],
    ['backend not a name', v4({ service: 'web', backends: [{ service: 'Web', weight: 1 }] }), 'spec.backends[0].service', '"Web"'],
    ['duplicate backend', v4({ service: 'web', backends: [{ service: 'a', weight: 1 }, { service: 'a', weight: 1 }] }), 'spec.backends[1].service', '"a"'],
    ['fractional weight', v4({ service: 'web', backends: [{ service: 'a', weight: 0.5 }] }), 'spec.backends[0].weight', '0.5'],
    ['negative weight', v4({ service: 'web', backends: [{ service: 'a', weight: -1 }] }), 'spec.backends[0].weight', '-1'],
    ['huge weight', v4({ service: 'web', backends: [{ service: 'a', weight: MAX_WEIGHT + 1 }] }), 'spec.backends[0].weight', String(MAX_WEIGHT + 1)],
    ['missing weight', v4({ service: 'web', backends: [{ service: 'a' }] }), 'spec.backends[0].weight', 'undefined'],
    ['bad quantity', v4({ service: 'web', backends: [{ service: 'a', weight: '10%' }] }), 'spec.backends[0].weight', '"10%"'],
    ['quantity finer than 1m', () => toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha1', { service: 'web', backends: [{ service: 'a', weight: '1u' }] })), 'spec.backends[0].weight', '"1u"'],
    ['negative quantity', () => toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha1', { service: 'web', backends: [{ service: 'a', weight: '-1' }] })), 'spec.backends[0].weight', '"-1"'],
    ['all weights 0', v4({ service: 'web', backends: [{ service: 'a', weight: 0 }, { service: 'b', weight: 0 }] }), 'spec.backends', 'all weights are 0'],
    ['matches in v1alpha2', () => toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha2', { ...good, matches: [{ kind: 'HTTPRouteGroup', name: 'g' }] })), 'spec.matches', 'v1alpha2'],
    ['matches in v1alpha1', () => toRecord('TrafficSplit', ts('split.smi-spec.io/v1alpha1', { ...good, matches: [{ kind: 'HTTPRouteGroup', name: 'g' }] })), 'spec.matches', 'v1alpha1'],
    ['matches not a list', v4({ ...good, matches: { kind: 'HTTPRouteGroup', name: 'g' } }), 'spec.matches', '{"kind":"HTTPRouteGroup","name":"g"}'],
    ['unknown kind in matches', v4({ ...good, matches: [{ kind: 'TCPRoute', name: 'g' }] }), 'spec.matches[0].kind', '"TCPRoute"'],
    ['no kind in matches', v4({ ...good, matches: [{ name: 'g' }] }), 'spec.matches[0].kind', 'undefined'],
    ['wrong apiGroup', v4({ ...good, matches: [{ apiGroup: 'gateway.networking.k8s.io', kind: 'HTTPRouteGroup', name: 'g' }] }), 'spec.matches[0].apiGroup', '"gateway.networking.k8s.io"'],
    ['bad group name', v4({ ...good, matches: [{ kind: 'HTTPRouteGroup', name: '' }] }), 'spec.matches[0].name', '""'],
    ['group named twice', v4({ ...good, matches: [{ kind: 'HTTPRouteGroup', name: 'g' }, { kind: 'HTTPRouteGroup', name: 'g' }] }), 'spec.matches[1].name', '"g"'],
  ])('%s', (_what, f, field, value) => {
    const e = fieldError(f);
    expect(e.field).toBe(field);
    expect(e.message).toContain(value);
  });
});

describe('quantities', () => {
  test.each([
    ['1', '1000'],
    ['500m', '500'],
    ['0.5', '500'],
    ['.5', '500'],
    ['1.5k', '1500000'],
    ['1Mi', '1048576000'],
    ['1e3', '1000000'],
    ['1E-3', '1'],
    ['100n', undefined],
    ['1000000n', '1'],
    ['+2', '2000'],
    [3, '3000'],
    [0.001, '1'],
    ['m', undefined],
    ['1 k', undefined],
    ['0x10', undefined],
    [true, undefined],
    [null, undefined],
  ])('%p', (q, milli) => {
    if (milli === undefined) expect(() => quantityMilli(q)).toThrow();
    else expect(String(quantityMilli(q))).toBe(milli);
  });
});
