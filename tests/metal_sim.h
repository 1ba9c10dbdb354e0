// Stand-ins for the Metal built-ins our kernels use, so the Metal source MLX generates compiles as
// C++ (g++ -std=c++20) and runs on the CPU: one std::thread per GPU thread, one threadgroup at a
// time. Address-space qualifiers and [[attributes]] vanish; threadgroup memory becomes function
// statics (shared by the threads of the running group); SIMD reductions exchange through a slot
// array. The stand-ins take exactly the types Metal's overloads would (a double or an int reaching
// fma/min/simd_sum is a compile error naming the call, not a silent conversion); vectors carry
// Metal's 16-byte alignment, so a misaligned uint4 load shows up under -fsanitize=alignment; every
// barrier gives up after SIM_BARRIER_MS milliseconds (default 60000) and names the call that not
// all threads reached (a divergent SIMD call would otherwise hang).
#pragma once
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define device
#define constant
#define threadgroup

typedef uint32_t uint;

namespace sim {
template <class T, class... U>
constexpr bool all_are = (std::is_same_v<T, U> && ...);
}

struct alignas(8) float2 {
  float x, y;
  float2() = default;
  template <class A, class B>
  float2(A a, B b) : x(a), y(b) {
    static_assert(sim::all_are<float, A, B>, "float2(...): give floats");
  }
};
struct alignas(16) float4 {
  float x, y, z, w;
  float4() = default;
  template <class A, class B, class C, class D>
  float4(A a, B b, C c, D d) : x(a), y(b), z(c), w(d) {
    static_assert(sim::all_are<float, A, B, C, D>, "float4(...): give floats");
  }
};
struct uint3 {
  uint32_t x, y, z;
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
  uint4() = default;
  template <class A, class B, class C, class D>
  uint4(A a, B b, C c, D d) : x(a), y(b), z(c), w(d) {
    static_assert(sim::all_are<uint32_t, A, B, C, D>, "uint4(...): give 32-bit unsigned ints");
  }
};

inline float sim_half_to_float(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 31, man = h & 1023;
  float v;
  if (exp == 0) v = std::ldexp((float)man, -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp((float)(man | 1024), (int)exp - 25);
  return sign ? -v : v;
}
struct half2 {
  uint16_t lo, hi;
  operator float2() const { return float2(sim_half_to_float(lo), sim_half_to_float(hi)); }
};

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even
    bits = (uint16_t)(u >> 16);
  }
  operator float() const {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

template <typename T, typename U>
inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}

namespace sim {
template <class A, class B, class C>
inline float fma_(A a, B b, C c) {
  static_assert(all_are<float, A, B, C>, "fma: the kernels' fma is float x float + float");
  return std::fma(a, b, c);
}
template <class A, class B>
inline float min_(A a, B b) {
  static_assert(all_are<float, A, B>, "min: the kernels' min is on two floats");
  return a < b ? a : b;
}
template <class A, class B>
inline float max_(A a, B b) {
  static_assert(all_are<float, A, B>, "max: the kernels' max is on two floats");
  return a > b ? a : b;
}
template <class A>
inline float exp_(A v) {
  static_assert(all_are<float, A>, "metal::exp: the kernels' exp is on a float");
  return std::exp(v);
}
}  // namespace sim
// Macros, so the C library's double overloads (::fma, ::exp) can never be picked instead.
#define fma(a, b, c) sim::fma_(a, b, c)
#define min(a, b) sim::min_(a, b)
#define max(a, b) sim::max_(a, b)
namespace metal {
template <class A>
inline float exp(A v) { return sim::exp_(v); }
}  // namespace metal

namespace mem_flags {
constexpr int mem_threadgroup = 1;
}

namespace sim {
inline int barrier_ms() {
  const char* s = std::getenv("SIM_BARRIER_MS");
  return s ? std::atoi(s) : 60000;
}

// A barrier for n threads that turns a wait longer than SIM_BARRIER_MS into an error naming `what`.
class TimedBarrier {
 public:
  TimedBarrier(int n, const char* what) : n_(n), what_(what) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::milliseconds(barrier_ms()), [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "sim: only %d of %d threads reached %s within %d ms: a divergent call?\n", count_, n_, what_, barrier_ms());
      std::fflush(stderr);
      std::_Exit(4);
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
  const char* what_;
};

struct Group {
  int size;
  std::unique_ptr<TimedBarrier> bar;
  std::vector<std::unique_ptr<TimedBarrier>> simd_bar;
  std::vector<float> fslot;
  std::vector<uint32_t> uslot;
};
inline Group* group = nullptr;
struct Ids {
  uint3 tpitg, tgpig;
  uint32_t lane, simd;
};
inline thread_local Ids ids;

template <class T, class F>
inline T simd_reduce(std::vector<T>& slot, T v, F op) {
  const int base = ids.simd * 32;
  slot[base + ids.lane] = v;
  group->simd_bar[ids.simd]->arrive_and_wait();
  T r = slot[base];
  for (int i = 1; i < 32; ++i) r = op(r, slot[base + i]);
  group->simd_bar[ids.simd]->arrive_and_wait();
  return r;
}

// Runs fn once per thread of a grid of (gx, gy, gz) threads in threadgroups of (tx, ty, tz), as
// MLX passes them to Metal. Metal would run partial threadgroups at the edges; the kernels assume
// whole ones, so a grid that is not a multiple of the threadgroup is an error here.
inline void launch(int gx, int gy, int gz, int tx, int ty, int tz, const std::function<void()>& fn) {
  if (ty != 1 || tz != 1 || tx % 32 != 0 || gx % tx != 0 || gy % ty != 0 || gz % tz != 0) {
    std::fprintf(stderr, "sim: grid (%d, %d, %d) is not whole threadgroups of (%d, %d, %d) of whole SIMD groups\n", gx, gy, gz, tx, ty, tz);
    std::exit(3);
  }
  for (int bz = 0; bz < gz; ++bz) {
    for (int by = 0; by < gy; ++by) {
      for (int bx = 0; bx < gx / tx; ++bx) {
        Group g;
        g.size = tx;
        g.bar = std::make_unique<TimedBarrier>(tx, "threadgroup_barrier");
        for (int s = 0; s < tx / 32; ++s) g.simd_bar.push_back(std::make_unique<TimedBarrier>(32, "a SIMD-group function"));
        g.fslot.assign(tx, 0.0f);
        g.uslot.assign(tx, 0u);
        group = &g;
        std::vector<std::thread> threads;
        for (int t = 0; t < tx; ++t) {
          threads.emplace_back([=] {
            ids.tpitg = {(uint32_t)t, 0, 0};
            ids.tgpig = {(uint32_t)bx, (uint32_t)by, (uint32_t)bz};
            ids.lane = t % 32;
            ids.simd = t / 32;
            fn();
          });
        }
        for (auto& th : threads) th.join();
        group = nullptr;
      }
    }
  }
}

// n elements of T from path, placed `offset` elements into a 16-byte-aligned buffer (an offset
// that is not a multiple of 16 bytes makes uint4 loads from it misaligned, as on a GPU).
template <typename T>
struct Buffer {
  std::vector<float4> store;  // 16-byte aligned storage
  T* ptr;
  T* data() { return ptr; }
};
template <typename T>
Buffer<T> read(const char* path, size_t n, size_t offset = 0) {
  Buffer<T> b;
  b.store.resize(((n + offset) * sizeof(T) + 15) / 16);
  b.ptr = reinterpret_cast<T*>(b.store.data()) + offset;
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(b.ptr, sizeof(T), n, f) != n) { std::fprintf(stderr, "cannot read %s\n", path); std::exit(2); }
  std::fclose(f);
  return b;
}
template <typename T>
void write(const char* path, const std::vector<T>& v) {
  FILE* f = std::fopen(path, "wb");
  std::fwrite(v.data(), sizeof(T), v.size(), f);
  std::fclose(f);
}
}  // namespace sim

inline void threadgroup_barrier(int) { sim::group->bar->arrive_and_wait(); }
template <class T>
inline float simd_sum(T v) {
  static_assert(sim::all_are<float, T>, "simd_sum: the kernels sum floats");
  return sim::simd_reduce<float>(sim::group->fslot, v, [](float a, float b) { return a + b; });
}
template <class T>
inline float simd_max(T v) {
  static_assert(sim::all_are<float, T>, "simd_max: the kernels take the max of floats");
  return sim::simd_reduce<float>(sim::group->fslot, v, [](float a, float b) { return a > b ? a : b; });
}
template <class T>
inline uint32_t simd_min(T v) {
  static_assert(sim::all_are<uint32_t, T>, "simd_min: the kernels take the min of 32-bit unsigned ints");
  return sim::simd_reduce<uint32_t>(sim::group->uslot, v, [](uint32_t a, uint32_t b) { return a < b ? a : b; });
}

// The Metal attributes the kernels name, read from the running thread.
#define SIM_ATTR_thread_position_in_threadgroup sim::ids.tpitg
#define SIM_ATTR_threadgroup_position_in_grid sim::ids.tgpig
#define SIM_ATTR_thread_index_in_simdgroup sim::ids.lane
#define SIM_ATTR_simdgroup_index_in_threadgroup sim::ids.simd
