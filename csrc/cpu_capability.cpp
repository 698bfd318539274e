// Which copy of the CPU kernels runs (see cpu_capability.h): what this CPU supports, what the
// environment asks for, and the ops that report and change the choice. Built once, for the
// baseline.
#include "cpu_capability.h"

#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define ATTNKERN_X86_64 1
#endif

namespace attnkern {
namespace cpu {
namespace {

std::atomic<int> active{-1};

const char* name_of(Capability c) {
  switch (c) {
    case Capability::AVX512_BF16:
      return "AVX512_BF16";
    case Capability::AVX512:
      return "AVX512";
    case Capability::AVX2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

// The widest capability this CPU and its operating system support: the widest copy that runs
// here (setup.py builds every copy on x86-64, none elsewhere).
Capability cpu_supports() {
#ifdef ATTNKERN_X86_64
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Capability::DEFAULT;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return Capability::DEFAULT;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  if ((xcr0 & 0x6) != 0x6) return Capability::DEFAULT;  // the OS saves XMM and YMM state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Capability::DEFAULT;
  if (!(b & (1u << 5))) return Capability::DEFAULT;  // AVX2
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) &&
                      (b & (1u << 31)) &&    // F, DQ, BW, VL
                      (xcr0 & 0xE0) == 0xE0;  // and opmask, ZMM state saved
  if (!avx512) return Capability::AVX2;
  // AVX512_BF16: CPUID leaf 7, subleaf 1, EAX bit 5
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5))) return Capability::AVX512_BF16;
  return Capability::AVX512;
#else
  return Capability::DEFAULT;
#endif
}

std::optional<Capability> parse(const std::string& value) {
  std::string v = value;
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (v == "default") return Capability::DEFAULT;
  if (v == "avx2") return Capability::AVX2;
  if (v == "avx512") return Capability::AVX512;
  if (v == "avx512_bf16") return Capability::AVX512_BF16;
  return std::nullopt;
}

// ATTNKERN_CPU_CAPABILITY (a value that is not a capability is an error), else
// ATEN_CPU_CAPABILITY (values of other architectures are ignored, as ATen ignores them on x86;
// its widest value, avx512, allows the AVX512_BF16 copy, which ATen has no name for), lowered
// to what runs here.
Capability from_environment() {
  const Capability usable = cpu_supports();
  const char* var = "ATTNKERN_CPU_CAPABILITY";
  const char* value = std::getenv(var);
  std::optional<Capability> wanted;
  if (value != nullptr && *value != '\0') {
    wanted = parse(value);
    TORCH_CHECK(wanted.has_value(), var, " must be one of default, avx2, avx512, avx512_bf16 ",
                "(any case), got '", value, "'");
  } else {
    var = "ATEN_CPU_CAPABILITY";
    value = std::getenv(var);
    if (value != nullptr) wanted = parse(value);
    if (wanted == Capability::AVX512 && usable == Capability::AVX512_BF16) wanted = usable;
  }
  if (!wanted.has_value()) return usable;
  if (static_cast<int>(*wanted) > static_cast<int>(usable)) {
    TORCH_WARN(var, "=", value, ": this CPU does not run ", name_of(*wanted),
               "; the CPU kernels use ", name_of(usable));
    return usable;
  }
  return *wanted;
}

std::vector<std::string> usable_names() {
  std::vector<std::string> names;
  for (int c = 0; c <= static_cast<int>(cpu_supports()); ++c) {
    names.emplace_back(name_of(static_cast<Capability>(c)));
  }
  return names;
}

// Sets the active capability (tests); returns the one active before.
std::string set_capability(const std::string& name) {
  const std::optional<Capability> c = parse(name);
  TORCH_CHECK(c.has_value(), "attnkern::_set_cpu_capability: capability must be one of default, avx2, "
              "avx512, avx512_bf16 (any case), got '", name, "'");
  TORCH_CHECK(static_cast<int>(*c) <= static_cast<int>(cpu_supports()), "attnkern::_set_cpu_capability: ",
              name_of(*c), " does not run on this CPU (usable: ", c10::Join(", ", usable_names()), ")");
  const Capability before = active_capability();
  active.store(static_cast<int>(*c), std::memory_order_relaxed);
  return name_of(before);
}

}  // namespace

Capability active_capability() {
  int now = active.load(std::memory_order_relaxed);
  if (now < 0) {
    static const int first = static_cast<int>(from_environment());  // throws again until valid
    int unset = -1;
    active.compare_exchange_strong(unset, first, std::memory_order_relaxed);
    now = active.load(std::memory_order_relaxed);
  }
  return static_cast<Capability>(now);
}

}  // namespace cpu
}  // namespace attnkern

TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def("cpu_capability() -> str",
        []() -> std::string { return attnkern::cpu::name_of(attnkern::cpu::active_capability()); });
  m.def("cpu_capabilities() -> str[]", []() { return attnkern::cpu::usable_names(); });
  m.def("_set_cpu_capability(str capability) -> str",
        [](std::string name) { return attnkern::cpu::set_capability(name); });
}
