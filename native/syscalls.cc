// fd-level operations: map elements, object info, links, attachments, pins,
// test runs, and getsockopt(SO_ORIGINAL_DST). Each function is one syscall
// (or one libbpf wrapper of one) with errno turned into a BpfError.
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/netfilter_ipv4.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "addon.h"

namespace fsm {

namespace {

Napi::Value Undef(const Napi::CallbackInfo& info) { return info.Env().Undefined(); }

Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  int fd = FdArg(info, 0);
  State(info.Env()).fds.erase(fd);
  if (close(fd) != 0 && errno != EINTR) ThrowErrno(info.Env(), "close", errno, "fd " + std::to_string(fd));
  return Undef(info);
}

// ---- object info -----------------------------------------------------------

template <typename T>
void GetInfo(const Napi::CallbackInfo& info, int fd, T* out) {
  memset(out, 0, sizeof *out);
  __u32 len = sizeof *out;
  if (bpf_obj_get_info_by_fd(fd, out, &len) != 0)
    ThrowErrno(info.Env(), "bpf_obj_get_info_by_fd", errno, "fd " + std::to_string(fd));
}

Napi::Value MapInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bpf_map_info mi;
  GetInfo(info, FdArg(info, 0), &mi);
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", Napi::Number::New(env, mi.id));
  o.Set("type", Napi::Number::New(env, mi.type));
  o.Set("keySize", Napi::Number::New(env, mi.key_size));
  o.Set("valueSize", Napi::Number::New(env, mi.value_size));
  o.Set("maxEntries", Napi::Number::New(env, mi.max_entries));
  o.Set("flags", Napi::Number::New(env, mi.map_flags));
  o.Set("name", Napi::String::New(env, mi.name));
  return o;
}

Napi::Value ProgInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bpf_prog_info pi;
  GetInfo(info, FdArg(info, 0), &pi);
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", Napi::Number::New(env, pi.id));
  o.Set("type", Napi::Number::New(env, pi.type));
  o.Set("name", Napi::String::New(env, pi.name));
  return o;
}

Napi::Value LinkInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bpf_link_info li;
  GetInfo(info, FdArg(info, 0), &li);
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", Napi::Number::New(env, li.id));
  o.Set("type", Napi::Number::New(env, li.type));
  o.Set("progId", Napi::Number::New(env, li.prog_id));
  if (li.type == BPF_LINK_TYPE_CGROUP) {
    o.Set("attachType", Napi::Number::New(env, li.cgroup.attach_type));
    o.Set("cgroupId", Napi::BigInt::New(env, static_cast<uint64_t>(li.cgroup.cgroup_id)));
  }
  return o;
}

// ---- links and attachments --------------------------------------------------

Napi::Value LinkCreate(const Napi::CallbackInfo& info) {
  int fd = bpf_link_create(FdArg(info, 0), FdArg(info, 1),
                           static_cast<bpf_attach_type>(info[2].As<Napi::Number>().Uint32Value()), nullptr);
  if (fd < 0) ThrowErrno(info.Env(), "bpf_link_create", errno);
  return Napi::Number::New(info.Env(), State(info.Env()).Track(fd));
}

// linkUpdate(linkFd, newProgFd, oldProgFd): oldProgFd >= 0 makes the swap
// conditional (BPF_F_REPLACE): it fails with EPERM if another program is in place.
Napi::Value LinkUpdate(const Napi::CallbackInfo& info) {
  bpf_link_update_opts opts;
  memset(&opts, 0, sizeof opts);
  opts.sz = sizeof opts;
  int old_fd = FdArg(info, 2);
  if (old_fd >= 0) {
    opts.flags = BPF_F_REPLACE;
    opts.old_prog_fd = old_fd;
  }
  if (bpf_link_update(FdArg(info, 0), FdArg(info, 1), &opts) != 0)
    ThrowErrno(info.Env(), "bpf_link_update", errno);
  return Undef(info);
}

Napi::Value LinkDetach(const Napi::CallbackInfo& info) {
  if (bpf_link_detach(FdArg(info, 0)) != 0) ThrowErrno(info.Env(), "bpf_link_detach", errno);
  return Undef(info);
}

Napi::Value ProgAttach(const Napi::CallbackInfo& info) {
  if (bpf_prog_attach(FdArg(info, 0), FdArg(info, 1),
                      static_cast<bpf_attach_type>(info[2].As<Napi::Number>().Uint32Value()),
                      info[3].As<Napi::Number>().Uint32Value()) != 0)
    ThrowErrno(info.Env(), "bpf_prog_attach", errno);
  return Undef(info);
}

Napi::Value ProgDetach(const Napi::CallbackInfo& info) {
  if (bpf_prog_detach2(FdArg(info, 0), FdArg(info, 1),
                       static_cast<bpf_attach_type>(info[2].As<Napi::Number>().Uint32Value())) != 0)
    ThrowErrno(info.Env(), "bpf_prog_detach2", errno);
  return Undef(info);
}

// ---- pins -------------------------------------------------------------------

Napi::Value ObjPin(const Napi::CallbackInfo& info) {
  std::string path = StrArg(info, 1);
  if (bpf_obj_pin(FdArg(info, 0), path.c_str()) != 0) ThrowErrno(info.Env(), "bpf_obj_pin", errno, path);
  return Undef(info);
}

Napi::Value ObjGet(const Napi::CallbackInfo& info) {
  std::string path = StrArg(info, 0);
  int fd = bpf_obj_get(path.c_str());
  if (fd < 0) ThrowErrno(info.Env(), "bpf_obj_get", errno, path);
  return Napi::Number::New(info.Env(), State(info.Env()).Track(fd));
}

// ---- map elements -----------------------------------------------------------
// Key and value Buffers have the map's sizes: TypeScript checks them.

Napi::Value MapLookup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto key = BufArg(info, 1);
  auto value = Napi::Buffer<uint8_t>::New(env, info[2].As<Napi::Number>().Uint32Value());
  if (bpf_map_lookup_elem(FdArg(info, 0), key.Data(), value.Data()) != 0) {
    if (errno == ENOENT) return env.Null();
    ThrowErrno(env, "bpf_map_lookup_elem", errno);
  }
  return value;
}

Napi::Value MapUpdate(const Napi::CallbackInfo& info) {
  auto key = BufArg(info, 1);
  auto value = BufArg(info, 2);
  if (bpf_map_update_elem(FdArg(info, 0), key.Data(), value.Data(), info[3].As<Napi::Number>().Uint32Value()) != 0)
    ThrowErrno(info.Env(), "bpf_map_update_elem", errno);
  return Undef(info);
}

// true when an element was deleted, false when there was none.
Napi::Value MapDelete(const Napi::CallbackInfo& info) {
  auto key = BufArg(info, 1);
  if (bpf_map_delete_elem(FdArg(info, 0), key.Data()) != 0) {
    if (errno == ENOENT) return Napi::Boolean::New(info.Env(), false);
    ThrowErrno(info.Env(), "bpf_map_delete_elem", errno);
  }
  return Napi::Boolean::New(info.Env(), true);
}

// mapNextKey(fd, key | null, keySize): the first key for null; null at the end.
Napi::Value MapNextKey(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto next = Napi::Buffer<uint8_t>::New(env, info[2].As<Napi::Number>().Uint32Value());
  const void* cur = info[1].IsNull() ? nullptr : BufArg(info, 1).Data();
  if (bpf_map_get_next_key(FdArg(info, 0), cur, next.Data()) != 0) {
    if (errno == ENOENT) return env.Null();
    ThrowErrno(env, "bpf_map_get_next_key", errno);
  }
  return next;
}

// mapUpdateBatch(fd, keys, values, count, elemFlags) -> count. On failure the
// BpfError carries `processed`, the number of elements the kernel applied.
Napi::Value MapUpdateBatch(const Napi::CallbackInfo& info) {
  bpf_map_batch_opts opts;
  memset(&opts, 0, sizeof opts);
  opts.sz = sizeof opts;
  opts.elem_flags = info[4].As<Napi::Number>().Uint32Value();
  __u32 count = info[3].As<Napi::Number>().Uint32Value();
  if (bpf_map_update_batch(FdArg(info, 0), BufArg(info, 1).Data(), BufArg(info, 2).Data(), &count, &opts) != 0)
    ThrowErrno(info.Env(), "bpf_map_update_batch", errno, "", "", count);
  return Napi::Number::New(info.Env(), count);
}

Napi::Value MapDeleteBatch(const Napi::CallbackInfo& info) {
  bpf_map_batch_opts opts;
  memset(&opts, 0, sizeof opts);
  opts.sz = sizeof opts;
  __u32 count = info[2].As<Napi::Number>().Uint32Value();
  if (bpf_map_delete_batch(FdArg(info, 0), BufArg(info, 1).Data(), &count, &opts) != 0)
    ThrowErrno(info.Env(), "bpf_map_delete_batch", errno, "", "", count);
  return Napi::Number::New(info.Env(), count);
}

// mapLookupBatch(fd, inBatch | null, keySize, valueSize, count, tokenSize) ->
// { keys, values, count, outBatch, done }. One BPF_MAP_LOOKUP_BATCH step:
// inBatch null starts at the beginning; `done` is the kernel's ENOENT (this
// was the last chunk, possibly with elements). ENOSPC with nothing returned
// means a hash bucket holds more than `count` elements: retry with more.
Napi::Value MapLookupBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t key_size = info[2].As<Napi::Number>().Uint32Value();
  uint32_t value_size = info[3].As<Napi::Number>().Uint32Value();
  __u32 count = info[4].As<Napi::Number>().Uint32Value();
  uint32_t token_size = info[5].As<Napi::Number>().Uint32Value();
  auto keys = Napi::Buffer<uint8_t>::New(env, static_cast<size_t>(key_size) * count);
  auto values = Napi::Buffer<uint8_t>::New(env, static_cast<size_t>(value_size) * count);
  auto out_batch = Napi::Buffer<uint8_t>::New(env, token_size);
  bpf_map_batch_opts opts;
  memset(&opts, 0, sizeof opts);
  opts.sz = sizeof opts;
  void* in_batch = info[1].IsNull() ? nullptr : BufArg(info, 1).Data();
  bool done = false;
  if (bpf_map_lookup_batch(FdArg(info, 0), in_batch, out_batch.Data(), keys.Data(), values.Data(), &count, &opts) != 0) {
    if (errno != ENOENT) ThrowErrno(env, "bpf_map_lookup_batch", errno, "", "", count);
    done = true;
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("keys", keys);
  o.Set("values", values);
  o.Set("count", Napi::Number::New(env, count));
  o.Set("outBatch", out_batch);
  o.Set("done", Napi::Boolean::New(env, done));
  return o;
}

// ---- test runs --------------------------------------------------------------

// progTestRun(fd, dataIn, dataOutSize, repeat) -> { retval, data, durationNs }
Napi::Value ProgTestRun(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto in = BufArg(info, 1);
  auto out = Napi::Buffer<uint8_t>::New(env, info[2].As<Napi::Number>().Uint32Value());
  bpf_test_run_opts opts;
  memset(&opts, 0, sizeof opts);
  opts.sz = sizeof opts;
  opts.data_in = in.Data();
  opts.data_size_in = in.Length();
  opts.data_out = out.Length() ? out.Data() : nullptr;
  opts.data_size_out = out.Length();
  opts.repeat = info[3].As<Napi::Number>().Uint32Value();
  if (bpf_prog_test_run_opts(FdArg(info, 0), &opts) != 0) ThrowErrno(env, "bpf_prog_test_run_opts", errno);
  Napi::Object o = Napi::Object::New(env);
  o.Set("retval", Napi::Number::New(env, opts.retval));
  o.Set("data", Napi::Buffer<uint8_t>::Copy(env, out.Data(), std::min<size_t>(opts.data_size_out, out.Length())));
  o.Set("durationNs", Napi::Number::New(env, opts.duration));
  return o;
}

// ---- sockets ----------------------------------------------------------------

// The pre-NAT destination of an IPv4 TCP connection (netfilter conntrack or
// the eBPF dataplane's cgroup/getsockopt program answer it).
Napi::Value OriginalDst(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  socklen_t len = sizeof sa;
  if (getsockopt(FdArg(info, 0), SOL_IP, SO_ORIGINAL_DST, &sa, &len) != 0)
    ThrowErrno(env, "getsockopt(SO_ORIGINAL_DST)", errno, "fd " + std::to_string(FdArg(info, 0)));
  char addr[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &sa.sin_addr, addr, sizeof addr);
  Napi::Object o = Napi::Object::New(env);
  o.Set("address", addr);
  o.Set("port", Napi::Number::New(env, ntohs(sa.sin_port)));
  return o;
}

Napi::Value NumPossibleCpus(const Napi::CallbackInfo& info) {
  int n = libbpf_num_possible_cpus();
  if (n < 0) ThrowErrno(info.Env(), "libbpf_num_possible_cpus", -n);
  return Napi::Number::New(info.Env(), n);
}

}  // namespace

void RegisterSyscalls(Napi::Env env, Napi::Object exports) {
  struct Fn {
    const char* name;
    Napi::Value (*fn)(const Napi::CallbackInfo&);
  };
  const Fn fns[] = {
      {"closeFd", CloseFd},           {"mapInfo", MapInfo},
      {"progInfo", ProgInfo},         {"linkInfo", LinkInfo},
      {"linkCreate", LinkCreate},     {"linkUpdate", LinkUpdate},
      {"linkDetach", LinkDetach},     {"progAttach", ProgAttach},
      {"progDetach", ProgDetach},     {"objPin", ObjPin},
      {"objGet", ObjGet},             {"mapLookup", MapLookup},
      {"mapUpdate", MapUpdate},       {"mapDelete", MapDelete},
      {"mapNextKey", MapNextKey},     {"mapUpdateBatch", MapUpdateBatch},
      {"mapDeleteBatch", MapDeleteBatch}, {"mapLookupBatch", MapLookupBatch},
      {"progTestRun", ProgTestRun},
      {"originalDst", OriginalDst},   {"numPossibleCpus", NumPossibleCpus},
  };
  for (const Fn& f : fns) exports.Set(f.name, Napi::Function::New(env, f.fn, f.name));
}

}  // namespace fsm
