import { InvalidInputError } from '../../src/errors.js';
import { BpfError, NotSupportedError, VerifierError, codecs, errnoName, kernelAtLeast, parseVerifierLog } from '../../src/ebpf/index.js';

/** The pure parts of src/ebpf: codecs, error shaping, log parsing. No kernel needed. */

describe('codecs', () => {
  test('integers round-trip in host order and reject what does not fit', () => {
    expect(codecs.u32.decode(codecs.u32.encode(0xdeadbeef))).toBe(0xdeadbeef);
    expect(codecs.u16.encode(0x0102)).toEqual(Buffer.from([0x02, 0x01])); // little-endian test hosts (x86_64, arm64)
    expect(codecs.u64.decode(codecs.u64.encode(2n ** 63n))).toBe(2n ** 63n);
    expect(() => codecs.u32.encode(2 ** 32)).toThrow(InvalidInputError);
    expect(() => codecs.u8.encode(1.5)).toThrow(/invalid u8 1.5/);
    expect(() => codecs.u64.encode(-1n)).toThrow(InvalidInputError);
  });

  test('ipv4 is network order; raw checks its size', () => {
    expect(codecs.ipv4.encode('10.1.2.3')).toEqual(Buffer.from([10, 1, 2, 3]));
    expect(codecs.ipv4.decode(Buffer.from([192, 168, 0, 1]))).toBe('192.168.0.1');
    expect(() => codecs.ipv4.encode('10.1.2.256')).toThrow(/invalid ipv4 "10.1.2.256"/);
    expect(() => codecs.raw(4).encode(Buffer.alloc(3))).toThrow(/4 bytes/);
  });

  test('struct places fields at the stated offsets and zeroes padding', () => {
    const c = codecs.struct<{ ip: string; port: number; id: bigint }>(16, {
      ip: { offset: 0, codec: codecs.ipv4 },
      port: { offset: 4, codec: codecs.u16 },
      id: { offset: 8, codec: codecs.u64 },
    });
    const b = c.encode({ ip: '1.2.3.4', port: 80, id: 5n });
    expect(b.toString('hex')).toBe('010203045000000005000000' + '00000000');
    expect(c.decode(b)).toEqual({ ip: '1.2.3.4', port: 80, id: 5n });
    expect(() => codecs.struct(4, { x: { offset: 2, codec: codecs.u32 } })).toThrow(/does not fit in 4 bytes/);
  });
});

describe('errors', () => {
  test('BpfError names the errno symbolically', () => {
    const e = new BpfError('bpf_obj_get /x: No such file or directory', { errno: 2, syscall: 'bpf_obj_get' });
    expect(e.message).toContain('(ENOENT)');
    expect([e.code, e.errno, e.errnoCode, e.syscall]).toEqual(['FSMN_ERR_BPF', 2, 'ENOENT', 'bpf_obj_get']);
    expect(errnoName(524)).toBe('ENOTSUPP');
  });

  test('VerifierError puts the program and the log tail in the message', () => {
    const log = Array.from({ length: 50 }, (_, i) => `line ${i}`).join('\n') + '\n';
    const e = new VerifierError('Permission denied', { log, program: 'p1', errno: 13 });
    expect(e.code).toBe('FSMN_ERR_BPF_VERIFIER');
    expect(e.message).toContain("program 'p1'");
    expect(e.message).toContain('line 49');
    expect(e.message).not.toContain('line 29\n');
    expect(e.log).toBe(log);
  });

  test('NotSupportedError names the feature and the kernel that has it', () => {
    const e = new NotSupportedError('cgroup bpf_link', { minKernel: '5.7' });
    expect(e.code).toBe('FSMN_ERR_NOT_SUPPORTED');
    expect(e.message).toBe('cgroup bpf_link is not supported here (needs Linux 5.7 or later)');
  });
});

describe('parseVerifierLog', () => {
  test('extracts the program and its log from libbpf output', () => {
    const out = [
      "libbpf: prog 'bad': BPF program load failed: Permission denied",
      "libbpf: prog 'bad': -- BEGIN PROG LOAD LOG --",
      '0: R1=ctx() R10=fp0',
      'invalid access to map value',
      '-- END PROG LOAD LOG --',
      "libbpf: failed to load object 'x'",
    ].join('\n');
    expect(parseVerifierLog(out)).toEqual({ program: 'bad', log: '0: R1=ctx() R10=fp0\ninvalid access to map value\n' });
    expect(parseVerifierLog('libbpf: map create failed')).toBeUndefined();
  });
});

test('kernelAtLeast compares major.minor', () => {
  expect(kernelAtLeast('5.7', '6.1.0-18-amd64')).toBe(true);
  expect(kernelAtLeast('5.7', '5.7.0')).toBe(true);
  expect(kernelAtLeast('5.9', '5.8.12')).toBe(false);
  expect(kernelAtLeast('5.10', '5.9.0')).toBe(false);
});
