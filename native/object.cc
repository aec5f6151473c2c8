// Object lifecycle through libbpf: open a .o file, describe and edit it before
// load (map sizes, initial data, pin paths), load it, hand out fds.
//
// After a successful load every map and program fd is duplicated for JS and
// the bpf_object is closed: from then on each BpfMap / Program in TypeScript
// owns exactly one fd and can be closed on its own. On a failed load libbpf
// unloads what it created (and unpins what it pinned) and we close the
// object, so nothing stays in the kernel.
#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "addon.h"

namespace fsm {

namespace {

bpf_object* ObjectArg(const Napi::CallbackInfo& info, size_t i) {
  Addon& a = State(info.Env());
  uint32_t id = info[i].As<Napi::Number>().Uint32Value();
  auto it = a.objects.find(id);
  if (it == a.objects.end()) ThrowErrno(info.Env(), "bpf_object", EBADF, "handle " + std::to_string(id));
  return it->second;
}

bpf_map* MapArg(const Napi::CallbackInfo& info, bpf_object* obj, size_t i) {
  std::string name = StrArg(info, i);
  bpf_map* map = bpf_object__find_map_by_name(obj, name.c_str());
  if (map == nullptr) ThrowErrno(info.Env(), "bpf_object__find_map_by_name", ENOENT, "'" + name + "'");
  return map;
}

Napi::Value Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = StrArg(info, 0);
  LibbpfCapture cap;
  bpf_object* obj = bpf_object__open_file(path.c_str(), nullptr);
  int err = errno;
  if (obj == nullptr) ThrowErrno(env, "bpf_object__open_file", err, path, cap.text());
  Addon& a = State(env);
  uint32_t id = a.next_object_id++;
  a.objects[id] = obj;
  return Napi::Number::New(env, id);
}

// { maps: [{name, type, keySize, valueSize, maxEntries, internal, pinPath}],
//   programs: [{name, section, type, expectedAttachType}] }
Napi::Value Describe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bpf_object* obj = ObjectArg(info, 0);
  Napi::Array maps = Napi::Array::New(env);
  bpf_map* map;
  uint32_t i = 0;
  bpf_object__for_each_map(map, obj) {
    Napi::Object m = Napi::Object::New(env);
    m.Set("name", bpf_map__name(map));
    m.Set("type", Napi::Number::New(env, bpf_map__type(map)));
    m.Set("keySize", Napi::Number::New(env, bpf_map__key_size(map)));
    m.Set("valueSize", Napi::Number::New(env, bpf_map__value_size(map)));
    m.Set("maxEntries", Napi::Number::New(env, bpf_map__max_entries(map)));
    m.Set("internal", Napi::Boolean::New(env, bpf_map__is_internal(map)));
    const char* pin = bpf_map__pin_path(map);
    m.Set("pinPath", pin ? Napi::Value(Napi::String::New(env, pin)) : env.Null());
    maps.Set(i++, m);
  }
  Napi::Array progs = Napi::Array::New(env);
  bpf_program* prog;
  i = 0;
  bpf_object__for_each_program(prog, obj) {
    Napi::Object p = Napi::Object::New(env);
    p.Set("name", bpf_program__name(prog));
    p.Set("section", bpf_program__section_name(prog));
    p.Set("type", Napi::Number::New(env, bpf_program__type(prog)));
    p.Set("expectedAttachType", Napi::Number::New(env, bpf_program__expected_attach_type(prog)));
    progs.Set(i++, p);
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("maps", maps);
  out.Set("programs", progs);
  return out;
}

// Every variable of every BTF DATASEC: [{section, name, offset, size}]. libbpf
// has already filled in the real offsets while opening the object.
Napi::Value Datasecs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bpf_object* obj = ObjectArg(info, 0);
  Napi::Array out = Napi::Array::New(env);
  const struct btf* btf = bpf_object__btf(obj);
  if (btf == nullptr) return out;
  uint32_t n = 0;
  uint32_t count = btf__type_cnt(btf);
  for (uint32_t id = 1; id < count; id++) {
    const struct btf_type* t = btf__type_by_id(btf, id);
    if (!btf_is_datasec(t)) continue;
    const char* section = btf__name_by_offset(btf, t->name_off);
    const struct btf_var_secinfo* vsi = btf_var_secinfos(t);
    for (uint16_t k = 0; k < btf_vlen(t); k++, vsi++) {
      const struct btf_type* var = btf__type_by_id(btf, vsi->type);
      Napi::Object v = Napi::Object::New(env);
      v.Set("section", section ? section : "");
      v.Set("name", btf__name_by_offset(btf, var->name_off));
      v.Set("offset", Napi::Number::New(env, vsi->offset));
      v.Set("size", Napi::Number::New(env, vsi->size));
      out.Set(n++, v);
    }
  }
  return out;
}

Napi::Value SetMaxEntries(const Napi::CallbackInfo& info) {
  bpf_object* obj = ObjectArg(info, 0);
  bpf_map* map = MapArg(info, obj, 1);
  int err = bpf_map__set_max_entries(map, info[2].As<Napi::Number>().Uint32Value());
  if (err) ThrowErrno(info.Env(), "bpf_map__set_max_entries", -err, StrArg(info, 1));
  return info.Env().Undefined();
}

Napi::Value GetInitialValue(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bpf_object* obj = ObjectArg(info, 0);
  bpf_map* map = MapArg(info, obj, 1);
  size_t size = 0;
  const void* data = bpf_map__initial_value(map, &size);
  if (data == nullptr) return env.Null();
  return Napi::Buffer<uint8_t>::Copy(env, static_cast<const uint8_t*>(data), size);
}

Napi::Value SetInitialValue(const Napi::CallbackInfo& info) {
  bpf_object* obj = ObjectArg(info, 0);
  bpf_map* map = MapArg(info, obj, 1);
  Napi::Buffer<uint8_t> buf = BufArg(info, 2);
  int err = bpf_map__set_initial_value(map, buf.Data(), buf.Length());
  if (err) ThrowErrno(info.Env(), "bpf_map__set_initial_value", -err, StrArg(info, 1));
  return info.Env().Undefined();
}

// null clears the pin path: the map is then neither pinned nor reused.
Napi::Value SetPinPath(const Napi::CallbackInfo& info) {
  bpf_object* obj = ObjectArg(info, 0);
  bpf_map* map = MapArg(info, obj, 1);
  std::string path = info[2].IsNull() ? "" : StrArg(info, 2);
  int err = bpf_map__set_pin_path(map, path.empty() ? nullptr : path.c_str());
  if (err) ThrowErrno(info.Env(), "bpf_map__set_pin_path", -err, path);
  return info.Env().Undefined();
}

int DupFd(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 3); }

// Loads and always consumes the object. Returns { maps: {name: fd}, programs: {name: fd} }.
Napi::Value Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bpf_object* obj = ObjectArg(info, 0);
  Addon& a = State(env);
  a.objects.erase(info[0].As<Napi::Number>().Uint32Value());

  LibbpfCapture cap;
  int err = bpf_object__load(obj);
  if (err) {
    bpf_object__close(obj);
    ThrowErrno(env, "bpf_object__load", -err, "", cap.text());
  }

  std::vector<int> dups;
  auto dup_or_fail = [&](int fd, const char* name) {
    int d = DupFd(fd);
    if (d < 0) {
      int e = errno;
      for (int x : dups) close(x);
      bpf_object__close(obj);
      ThrowErrno(env, "fcntl(F_DUPFD_CLOEXEC)", e, name);
    }
    dups.push_back(d);
    return d;
  };
  Napi::Object maps = Napi::Object::New(env);
  Napi::Object progs = Napi::Object::New(env);
  bpf_map* map;
  bpf_object__for_each_map(map, obj) {
    int fd = bpf_map__fd(map);
    if (fd >= 0) maps.Set(bpf_map__name(map), Napi::Number::New(env, dup_or_fail(fd, bpf_map__name(map))));
  }
  bpf_program* prog;
  bpf_object__for_each_program(prog, obj) {
    int fd = bpf_program__fd(prog);
    if (fd >= 0)
      progs.Set(bpf_program__name(prog), Napi::Number::New(env, dup_or_fail(fd, bpf_program__name(prog))));
  }
  bpf_object__close(obj);
  for (int d : dups) a.Track(d);
  Napi::Object out = Napi::Object::New(env);
  out.Set("maps", maps);
  out.Set("programs", progs);
  return out;
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  Addon& a = State(info.Env());
  auto it = a.objects.find(info[0].As<Napi::Number>().Uint32Value());
  if (it != a.objects.end()) {
    bpf_object__close(it->second);
    a.objects.erase(it);
  }
  return info.Env().Undefined();
}

}  // namespace

void RegisterObject(Napi::Env env, Napi::Object exports) {
  exports.Set("objectOpen", Napi::Function::New(env, Open, "objectOpen"));
  exports.Set("objectDescribe", Napi::Function::New(env, Describe, "objectDescribe"));
  exports.Set("objectDatasecs", Napi::Function::New(env, Datasecs, "objectDatasecs"));
  exports.Set("objectSetMaxEntries", Napi::Function::New(env, SetMaxEntries, "objectSetMaxEntries"));
  exports.Set("objectGetInitialValue", Napi::Function::New(env, GetInitialValue, "objectGetInitialValue"));
  exports.Set("objectSetInitialValue", Napi::Function::New(env, SetInitialValue, "objectSetInitialValue"));
  exports.Set("objectSetPinPath", Napi::Function::New(env, SetPinPath, "objectSetPinPath"));
  exports.Set("objectLoad", Napi::Function::New(env, Load, "objectLoad"));
  exports.Set("objectClose", Napi::Function::New(env, Close, "objectClose"));
}

}  // namespace fsm
