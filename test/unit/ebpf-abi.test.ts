import { existsSync } from 'node:fs';
import { MapName, mapLayout } from '../../src/dataplane/ebpf/abi.js';
import { ALL_PROGRAMS, ATTACHMENTS, OBJECTS, SK_MSG, objectPath } from '../../src/dataplane/ebpf/objects.js';
import { ObjectSpec } from '../../src/ebpf/index.js';
import { bpfObjectDir } from '../../src/util/paths.js';

/**
 * The TypeScript mirror of bpf/include/fsm_abi.h against the built objects:
 * every object declares every map with the key and value sizes abi.ts
 * encodes, and the programs the dataplane attaches exist under their names.
 * Needs `npm run build:bpf` and the addon (parsing an ELF needs no root).
 */
describe('eBPF ABI: TypeScript codecs match the objects', () => {
  const dir = bpfObjectDir();

  test('the objects are built', () => {
    expect(OBJECTS.filter((o) => !existsSync(objectPath(dir, o)))).toEqual([]);
  });

  test.each(OBJECTS.map((o) => [o]))('%s.o declares every map with the sizes abi.ts encodes', (name) => {
    using spec = ObjectSpec.fromFile(objectPath(dir, name));
    const layout = Object.fromEntries(
      Object.values(MapName).map((m) => {
        const s = spec.maps.get(m);
        return [m, s === undefined ? undefined : { keySize: s.keySize, valueSize: s.valueSize }];
      }),
    );
    expect(layout).toEqual(mapLayout);
    expect([...spec.maps.values()].filter((m) => m.section === undefined && !m.pinByName).map((m) => m.name)).toEqual([]);
  });

  test('every program the dataplane attaches is in its object', () => {
    const found: string[] = [];
    for (const o of OBJECTS) {
      using spec = ObjectSpec.fromFile(objectPath(dir, o));
      for (const a of [...ATTACHMENTS.filter((x) => x.object === o), ...(SK_MSG.object === o ? [SK_MSG] : [])]) {
        if (spec.programs.has(a.program)) found.push(a.program);
      }
    }
    expect(found.sort()).toEqual([...ALL_PROGRAMS].sort());
  });
});
