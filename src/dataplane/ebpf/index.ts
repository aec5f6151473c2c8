/** The eBPF interception dataplane; see dataplane.ts and bpf/ for the kernel side. */
export { EbpfApplyError, EbpfDataplane, type EbpfDataplaneOptions } from './dataplane.js';
export { DEFAULT_CAPACITY, type Capacity } from './objects.js';
