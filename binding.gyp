{
  "targets": [
    {
      "target_name": "fsm_bpf",
      "sources": ["native/addon.cc", "native/object.cc", "native/syscalls.cc", "native/static_libbpf.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
      "cflags_cc!": ["-fno-exceptions"],
      "ldflags": ["-Wl,--exclude-libs,ALL"],
      # Debian's libbpf.a and libz.a are linked in statically, so the addon
      # does not depend on the node's libbpf version. libelf stays dynamic:
      # Debian's libelf.a keeps its error state in local-exec TLS
      # (R_X86_64_TPOFF32), which cannot go into a shared object. libelf1 is
      # on every Debian node that has iproute2.
      "libraries": ["-Wl,-Bstatic", "-lbpf", "-lz", "-Wl,-Bdynamic", "-lelf"]
    }
  ]
}
