/**
 * The eBPF object model: ObjectSpec (a parsed object, editable) -> load ->
 * Collection (live maps and programs) -> Program.attachCgroup -> Link.
 * Lifetime is explicit: close() everything you open (or `using`).
 */
export { codecs, type Codec, type StructFields } from './codec.js';
export { AttachType, LinkType, MapType, ProgType, UpdateFlag, perCpuMapTypes, type UpdateMode } from './constants.js';
export { BpfError, ClosedError, KeyNotFoundError, NotSupportedError, VerifierError, errnoName, type BpfErrorInfo } from './errors.js';
export { bpfFdKind, type BpfFdKind } from './fd.js';
export { BpfMap } from './map.js';
export { Collection, ObjectSpec, parseVerifierLog, type LoadOptions, type MapSpec, type ProgramSpec } from './object.js';
export { Link, Program, kernelAtLeast, type LinkInfo } from './program.js';
export { originalDst } from './sockopt.js';
