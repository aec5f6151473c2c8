// Module entry, per-environment state, libbpf message capture and errors.
#include "addon.h"

#include <bpf/libbpf.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>

namespace fsm {

namespace {

// libbpf has one global print callback; each thread captures into its own
// buffer while a call is in flight, so worker threads do not mix messages.
thread_local std::string* capture_target = nullptr;

int PrintToCapture(enum libbpf_print_level level, const char* fmt, va_list args) {
  // Debug output is too verbose to keep; outside a capture we stay silent:
  // every failure reaches the caller as an error carrying the captured text.
  if (capture_target == nullptr || level == LIBBPF_DEBUG) return 0;
  va_list copy;
  va_copy(copy, args);
  int n = vsnprintf(nullptr, 0, fmt, copy);
  va_end(copy);
  if (n <= 0) return 0;
  std::string chunk(static_cast<size_t>(n) + 1, '\0');
  vsnprintf(chunk.data(), chunk.size(), fmt, args);
  chunk.resize(static_cast<size_t>(n));
  capture_target->append(chunk);
  return n;
}

}  // namespace

LibbpfCapture::LibbpfCapture() : prev_(capture_target) { capture_target = &text_; }
LibbpfCapture::~LibbpfCapture() { capture_target = prev_; }

void InitLibbpf() {
  static std::once_flag once;
  std::call_once(once, [] { libbpf_set_print(PrintToCapture); });
}

Addon::~Addon() {
  for (auto& [id, obj] : objects) bpf_object__close(obj);
  for (int fd : fds) close(fd);
  // The environment is going away; deleting the reference now is not allowed.
  bpf_error.SuppressDestruct();
}

Addon& State(const Napi::Env& env) {
  Addon* a = env.GetInstanceData<Addon>();
  return *a;
}

void ThrowErrno(const Napi::Env& env, const char* syscall, int err, const std::string& what,
                const std::string& log, int64_t processed) {
  // libbpf_strerror knows libbpf's own codes (4000+, e.g. "not a proper ELF") as well as errno.
  char reason[256];
  if (libbpf_strerror(err, reason, sizeof reason) != 0) snprintf(reason, sizeof reason, "error %d", err);
  std::string message = std::string(syscall);
  if (!what.empty()) message += " " + what;
  message += ": ";
  message += reason;
  Addon& a = State(env);
  Napi::Object details = Napi::Object::New(env);
  details.Set("errno", Napi::Number::New(env, err));
  details.Set("syscall", Napi::String::New(env, syscall));
  details.Set("reason", Napi::String::New(env, reason));
  if (!log.empty()) details.Set("libbpfLog", Napi::String::New(env, log));
  if (processed >= 0) details.Set("processed", Napi::Number::New(env, static_cast<double>(processed)));
  if (a.bpf_error.IsEmpty()) {  // init() not called: a plain Error with the same fields
    Napi::Error e = Napi::Error::New(env, message);
    Napi::Array keys = details.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); i++) e.Set(keys.Get(i).As<Napi::String>(), details.Get(keys.Get(i)));
    throw e;
  }
  Napi::Value e = a.bpf_error.New({Napi::String::New(env, message), details});
  throw Napi::Error(env, e);
}

int FdArg(const Napi::CallbackInfo& info, size_t i) {
  return info[i].As<Napi::Number>().Int32Value();
}

std::string StrArg(const Napi::CallbackInfo& info, size_t i) {
  return info[i].As<Napi::String>().Utf8Value();
}

Napi::Buffer<uint8_t> BufArg(const Napi::CallbackInfo& info, size_t i) {
  return info[i].As<Napi::Buffer<uint8_t>>();
}

namespace {

// init({ BpfError }): the error class native code throws, constructed as
// new BpfError(message, { errno, syscall, reason, libbpfLog?, processed? }).
Napi::Value Init(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object classes = info[0].As<Napi::Object>();
  State(env).bpf_error = Napi::Persistent(classes.Get("BpfError").As<Napi::Function>());
  return env.Undefined();
}

}  // namespace

Napi::Object ModuleInit(Napi::Env env, Napi::Object exports) {
  InitLibbpf();
  env.SetInstanceData<Addon>(new Addon());
  exports.Set("init", Napi::Function::New(env, Init, "init"));
  RegisterObject(env, exports);
  RegisterSyscalls(env, exports);
  return exports;
}

}  // namespace fsm

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return fsm::ModuleInit(env, exports); }

NODE_API_MODULE(fsm_bpf, InitModule)
