// Which of the kernel libraries this CPU runs (gptoss_jax.native.LEVELS). Only the portable library
// holds this, so asking never loads code the CPU might not run.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), with Linux granting the process the tile
// state (8 KB per thread, saved on context switches only for processes that ask).
bool AmxRuns() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__) && defined(SYS_arch_prctl)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tiles = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
  return tiles && bf16 && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
  return false;
#endif
}

}  // namespace

// The best level this CPU (and its OS's register saving) runs: 3 = amx, 2 = avx512, 1 = avx2, 0 = portable.
extern "C" int GptossCpuLevel() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (avx512 && __builtin_cpu_supports("avx512bf16") && AmxRuns()) return 3;
  if (avx512) return 2;
  if (avx2) return 1;
#endif
  return 0;
}
