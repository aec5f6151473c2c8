// Shared pieces of the fsm_bpf addon: per-environment state and error helpers.
// The addon is deliberately thin: it takes primitives, Buffers and fds, does
// what libbpf or the bpf(2) syscall does, and throws the project's own error
// classes (handed over from TypeScript by init()). All argument checking,
// defaults and the public API live in src/ebpf/.
#pragma once

#include <napi.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <unordered_set>

struct bpf_object;

namespace fsm {

// Everything one JS environment (main thread or a worker) owns. Destroyed by
// the environment's teardown, which closes what JS code left open.
struct Addon {
  std::unordered_map<uint32_t, bpf_object*> objects;  // opened, not yet loaded
  uint32_t next_object_id = 1;
  std::unordered_set<int> fds;  // every fd this addon handed to JS
  Napi::FunctionReference bpf_error;

  ~Addon();
  int Track(int fd) {
    fds.insert(fd);
    return fd;
  }
};

Addon& State(const Napi::Env& env);

// Throw a BpfError (the TypeScript class) with errno and the syscall or
// libbpf call that failed. `what` is appended to the message (a path, a map
// name); `log` carries what libbpf printed during the call.
[[noreturn]] void ThrowErrno(const Napi::Env& env, const char* syscall, int err,
                             const std::string& what = "", const std::string& log = "",
                             int64_t processed = -1);

// Arguments: JS has checked types already; these only convert.
int FdArg(const Napi::CallbackInfo& info, size_t i);
std::string StrArg(const Napi::CallbackInfo& info, size_t i);
Napi::Buffer<uint8_t> BufArg(const Napi::CallbackInfo& info, size_t i);

// Capture libbpf's printed messages for the lifetime of the object.
class LibbpfCapture {
 public:
  LibbpfCapture();
  ~LibbpfCapture();
  const std::string& text() const { return text_; }

 private:
  std::string text_;
  std::string* prev_;
};

void InitLibbpf();
void RegisterObject(Napi::Env env, Napi::Object exports);
void RegisterSyscalls(Napi::Env env, Napi::Object exports);
Napi::Object ModuleInit(Napi::Env env, Napi::Object exports);

}  // namespace fsm
