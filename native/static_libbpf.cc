// Makes Debian's libbpf.a linkable into a shared object.
//
// libbpf.a is built position-independent except for one thing: its default
// print function reaches libc's `stderr` with a PC-relative relocation
// (R_X86_64_PC32), which the linker only accepts when the symbol is defined
// inside the shared object itself. So we define a hidden `stderr` here and
// point it at libc's stream at load time. Only this addon's own references
// bind to it; the rest of the process keeps libc's symbol. libbpf's default
// printer is replaced in InitLibbpf() anyway, so this is a fallback.
#include <dlfcn.h>
#include <stdio.h>

extern "C" {
__attribute__((visibility("hidden"))) FILE* stderr = nullptr;
}

namespace {

__attribute__((constructor)) void BindLibcStderr() {
  void* sym = dlsym(RTLD_DEFAULT, "stderr");
  if (sym != nullptr) stderr = *static_cast<FILE**>(sym);
}

}  // namespace
