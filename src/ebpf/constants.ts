/**
 * UAPI numbers from <linux/bpf.h> that the dataplanes and tests use by name.
 * These are kernel ABI: the values never change once released.
 */

export const MapType = {
  Hash: 1,
  Array: 2,
  ProgArray: 3,
  PerfEventArray: 4,
  PercpuHash: 5,
  PercpuArray: 6,
  LruHash: 9,
  LruPercpuHash: 10,
  LpmTrie: 11,
  SockMap: 15,
  SockHash: 18,
  PercpuCgroupStorage: 21,
  SkStorage: 24,
  RingBuf: 27,
} as const;

export const ProgType = {
  SocketFilter: 1,
  SchedCls: 3,
  Xdp: 6,
  CgroupSkb: 8,
  CgroupSock: 9,
  SockOps: 13,
  SkSkb: 14,
  SkMsg: 16,
  CgroupSockAddr: 18,
  CgroupSockopt: 25,
} as const;

export const AttachType = {
  CgroupInetIngress: 0,
  CgroupInetEgress: 1,
  CgroupInetSockCreate: 2,
  CgroupSockOps: 3,
  SkSkbStreamParser: 4,
  SkSkbStreamVerdict: 5,
  SkMsgVerdict: 7,
  CgroupInet4Bind: 8,
  CgroupInet6Bind: 9,
  CgroupInet4Connect: 10,
  CgroupInet6Connect: 11,
  CgroupInet4PostBind: 12,
  CgroupInet6PostBind: 13,
  CgroupUdp4Sendmsg: 14,
  CgroupUdp6Sendmsg: 15,
  CgroupUdp4Recvmsg: 19,
  CgroupUdp6Recvmsg: 20,
  CgroupGetsockopt: 21,
  CgroupSetsockopt: 22,
  CgroupInet4Getpeername: 29,
  CgroupInet6Getpeername: 30,
  CgroupInet4Getsockname: 31,
  CgroupInet6Getsockname: 32,
  CgroupInetSockRelease: 34,
  SkSkbVerdict: 38,
} as const;

export const LinkType = {
  Cgroup: 3,
} as const;

/** Map per-CPU types: a value is one slot per possible CPU, each rounded up to 8 bytes. */
export const perCpuMapTypes: ReadonlySet<number> = new Set([
  MapType.PercpuHash,
  MapType.PercpuArray,
  MapType.LruPercpuHash,
  MapType.PercpuCgroupStorage,
]);

/** bpf_map_update_elem flags. */
export const UpdateFlag = { any: 0, noexist: 1, exist: 2 } as const;
export type UpdateMode = keyof typeof UpdateFlag;
