// The CUDA emulator (`cuda-emu` feature; tests only): the project's kernels (`src/*.cu`, the same
// files nvcc compiles) built for the host with runtime.h, and one C entry point that launches
// one of them by name. See runtime.h for how threads, barriers and shared memory are emulated.
#include "runtime.h"

#include "norm.cu"
#include "geglu.cu"
#include "attention.cu"

#include <ucontext.h>

#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

dim3 threadIdx, blockIdx, blockDim, gridDim;

// Kernels with the errors the emulator exists to find, for its own tests.
// A barrier only the even threads reach.
extern "C" __global__ void emu_check_divergent_barrier(float* out) {
  if (threadIdx.x % 2 == 0) __syncthreads();
  out[threadIdx.x] = 1.f;
}
// Reads the next thread's write with no barrier between.
extern "C" __global__ void emu_check_race(float* out) {
  __shared__ float buf[1024];
  buf[threadIdx.x] = (float)threadIdx.x;
  out[threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
}
// A warp-wide sum through shuffles: every lane gets the sum of the warp's lanes.
extern "C" __global__ void emu_check_warp_sum(float* out) {
  float v = (float)threadIdx.x;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

namespace ipr_emu {
namespace {
enum class State { Ready, AtBlock, AtWarp, Done };

struct Fiber {
  ucontext_t ctx;
  State state = State::Ready;
  std::vector<char> stack;
};

constexpr size_t STACK = 256 * 1024;
ucontext_t scheduler;
std::vector<Fiber> fibers;
int current = -1;
float slots[32][32];  // [warp][lane]: the shuffles' exchange buffer
void (*body)(void**, const double*) = nullptr;
void** body_args = nullptr;
const double* body_scalars = nullptr;

void entry() {
  body(body_args, body_scalars);
  fibers[current].state = State::Done;  // then back to the scheduler (uc_link)
}

const char* name(State s) {
  switch (s) {
    case State::AtBlock: return "at __syncthreads";
    case State::AtWarp: return "at a warp barrier";
    default: return "returned";  // Ready never shows: every thread has stopped when this is asked
  }
}

// Runs the block `blockIdx` to its end; an empty string, or why it cannot end.
std::string run_block(bool reverse) {
  const int n = (int)blockDim.x;
  if ((int)fibers.size() < n) fibers.resize(n);
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.stack.resize(STACK);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &scheduler;
    makecontext(&f.ctx, entry, 0);
    f.state = State::Ready;
  }
  for (;;) {
    for (int s = 0; s < n; ++s) {
      const int i = reverse ? n - 1 - s : s;
      if (fibers[i].state != State::Ready) continue;
      current = i;
      threadIdx = dim3{(unsigned)i, 0, 0};
      swapcontext(&scheduler, &fibers[i].ctx);
    }
    // Every thread now waits or has returned: release each warp whose lanes all wait at a warp
    // barrier, else the block if every thread waits at __syncthreads.
    int done = 0, at_block = 0;
    for (int i = 0; i < n; ++i) {
      done += fibers[i].state == State::Done;
      at_block += fibers[i].state == State::AtBlock;
    }
    if (done == n) return "";
    bool released = false;
    for (int w = 0; w * 32 < n; ++w) {
      bool all = true;
      for (int i = w * 32; i < w * 32 + 32 && i < n; ++i) all = all && fibers[i].state == State::AtWarp;
      if (!all) continue;
      for (int i = w * 32; i < w * 32 + 32 && i < n; ++i) fibers[i].state = State::Ready;
      released = true;
    }
    if (!released && at_block == n) {
      for (int i = 0; i < n; ++i) fibers[i].state = State::Ready;
      released = true;
    }
    if (!released) {
      // How many threads are where, with the first of each.
      std::string why = "deadlock: a barrier not every thread reaches (";
      for (State st : {State::AtBlock, State::AtWarp, State::Done}) {
        int count = 0, first = -1;
        for (int i = 0; i < n; ++i)
          if (fibers[i].state == st && count++ == 0) first = i;
        if (count > 0)
          why += std::to_string(count) + " " + name(st) + ", the first thread " + std::to_string(first) + "; ";
      }
      return why.substr(0, why.size() - 2) + ")";
    }
  }
}

struct Kernel {
  const char* file;  // the .cu file it is in (without the extension)
  const char* name;
  size_t pointers, scalars;
  unsigned max_threads;  // its __launch_bounds__, else the 1024 of every GPU
  void (*run)(void**, const double*);
};

// One entry: the kernel `NAME` of `FILE`.cu, taking `PTRS` pointers and `SCALARS` scalars, at most
// `THREADS` threads per block, called as `CALL` with the pointers `a` and the scalars `s`.
#define ENTRY(FILE, NAME, PTRS, SCALARS, THREADS, CALL) \
  {FILE, NAME, PTRS, SCALARS, THREADS, [](void** a, const double* s) { (void)s; CALL; }},
#define P(T, i) ((T*)a[i])

#define NORM_ENTRIES(T, S)                                                                                   \
  ENTRY("norm", "norm_fwd_" #S, 4, 5, 1024,                                                                  \
        norm_fwd_##S(P(const T, 0), P(const T, 1), P(const T, 2), P(T, 3), (int)s[0], (int)s[1], (int)s[2], \
                     (float)s[3], (int)s[4]))                                                                \
  ENTRY("norm", "norm_bwd_x_" #S, 5, 5, 1024,                                                                \
        norm_bwd_x_##S(P(const T, 0), P(const T, 1), P(const T, 2), P(const T, 3), P(T, 4), (int)s[0],      \
                       (int)s[1], (int)s[2], (float)s[3], (int)s[4]))
#define GEGLU_ENTRIES(T, S)                                                                                  \
  ENTRY("geglu", "geglu_fwd_" #S, 2, 2, 1024,                                                                \
        geglu_fwd_##S(P(const T, 0), P(T, 1), (long long)s[0], (long long)s[1]))                             \
  ENTRY("geglu", "geglu_bwd_" #S, 3, 2, 1024,                                                                \
        geglu_bwd_##S(P(const T, 0), P(const T, 1), P(T, 2), (long long)s[0], (long long)s[1]))
#define SOFTMAX_ENTRIES(T, S)                                                                                \
  ENTRY("attention", "softmax_scaled_" #S, 2, 2, 1024,                                                       \
        softmax_scaled_##S(P(const T, 0), P(T, 1), (long long)s[0], (float)s[1]))                            \
  ENTRY("attention", "softmax_grad_" #S, 4, 2, 1024,                                                         \
        softmax_grad_##S(P(const T, 0), P(const T, 1), P(const float, 2), P(T, 3), (long long)s[0],         \
                         (long long)s[1]))
// The flash entries come from attention.cu's own list of (head size, warps per block).
#undef FLASH_KERNEL
#define FLASH_KERNEL(T, S, D, WARPS)                                                                         \
  ENTRY("attention", "flash_fwd_d" #D "_" #S, 4, 4, 32 * (WARPS),                                            \
        flash_fwd_d##D##_##S(P(const T, 0), P(const T, 1), P(const T, 2), P(T, 3), (int)s[0], (int)s[1],    \
                             (int)s[2], (float)s[3]))

const Kernel KERNELS[] = {
    NORM_ENTRIES(float, f32) NORM_ENTRIES(__nv_bfloat16, bf16) NORM_ENTRIES(__half, f16)
    GEGLU_ENTRIES(float, f32) GEGLU_ENTRIES(__nv_bfloat16, bf16) GEGLU_ENTRIES(__half, f16)
    SOFTMAX_ENTRIES(float, f32) SOFTMAX_ENTRIES(__nv_bfloat16, bf16) SOFTMAX_ENTRIES(__half, f16)
    FLASH_KERNELS(__nv_bfloat16, bf16) FLASH_KERNELS(__half, f16)
    ENTRY("emu", "emu_check_divergent_barrier", 1, 0, 1024, emu_check_divergent_barrier(P(float, 0)))
    ENTRY("emu", "emu_check_race", 1, 0, 1024, emu_check_race(P(float, 0)))
    ENTRY("emu", "emu_check_warp_sum", 1, 0, 1024, emu_check_warp_sum(P(float, 0)))
};

std::mutex one_launch;  // shared memory and the scheduler are global
}  // namespace

void barrier(bool warp_only) {
  Fiber& f = fibers[current];
  f.state = warp_only ? State::AtWarp : State::AtBlock;
  swapcontext(&f.ctx, &scheduler);
}

float& lane_slot(int lane) { return slots[threadIdx.x >> 5][lane]; }
}  // namespace ipr_emu

// Launches the kernel `name` of `file` (the .cu file, without its extension) on `grid_x * grid_y` blocks of `block` threads with the pointer
// arguments `args` (in the kernel's order) then the scalars (each as f64, converted to the
// parameter's type); blocks in order, each block's threads first to last (`reverse`: last to
// first). 0 on success; otherwise 1 and why in `err`.
extern "C" int ipr_cuda_emu_launch(const char* file, const char* name, unsigned grid_x, unsigned grid_y, unsigned block, void** args,
                                   size_t n_args, const double* scalars, size_t n_scalars, int reverse, char* err,
                                   size_t err_len) {
  using namespace ipr_emu;
  const auto fail = [&](const std::string& why) {
    std::snprintf(err, err_len, "%s: %s", name, why.c_str());
    return 1;
  };
  const Kernel* k = nullptr;
  for (const Kernel& c : KERNELS)
    if (std::strcmp(c.name, name) == 0) k = &c;
  if (!k) return fail("no such kernel");
  if (std::strcmp(k->file, file) != 0) return fail(std::string("is in ") + k->file + ".cu, not in " + file + ".cu");
  if (n_args != k->pointers || n_scalars != k->scalars)
    return fail("takes " + std::to_string(k->pointers) + " pointers and " + std::to_string(k->scalars) +
                " scalars, given " + std::to_string(n_args) + " and " + std::to_string(n_scalars));
  if (block == 0 || block > k->max_threads || block % 32 != 0)
    return fail("a block of " + std::to_string(block) + " threads (a multiple of 32, at most " +
                std::to_string(k->max_threads) + ")");
  std::lock_guard<std::mutex> lock(one_launch);
  body = k->run;
  body_args = args;
  body_scalars = scalars;
  gridDim = dim3{grid_x, grid_y, 1};
  blockDim = dim3{block, 1, 1};
  for (unsigned y = 0; y < grid_y; ++y)
    for (unsigned x = 0; x < grid_x; ++x) {
      blockIdx = dim3{x, y, 0};
      const std::string why = run_block(reverse != 0);
      if (!why.empty()) return fail("block (" + std::to_string(x) + ", " + std::to_string(y) + "): " + why);
    }
  return 0;
}
