// Stand-ins for the Metal built-ins our kernels use, so the Metal-dialect source compiles as C++
// (g++ -std=c++20) and runs on the CPU: one std::thread per GPU thread, one threadgroup at a time.
// Address-space qualifiers and [[attributes]] vanish; threadgroup memory becomes function statics
// (shared by the threads of the running group); SIMD reductions exchange through a slot array.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define device
#define constant
#define threadgroup

typedef uint32_t uint;

struct float2 {
  float x, y;
  float2() = default;
  float2(float a, float b) : x(a), y(b) {}
};
struct float4 {
  float x, y, z, w;
  float4() = default;
  float4(float a, float b, float c, float d) : x(a), y(b), z(c), w(d) {}
};
struct uint3 {
  uint32_t x, y, z;
};
struct uint4 {
  uint32_t x, y, z, w;
  uint4() = default;
  uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) : x(a), y(b), z(c), w(d) {}
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

inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float min(float a, float b) { return a < b ? a : b; }
inline float max(float a, float b) { return a > b ? a : b; }
namespace metal {
inline float exp(float v) { return std::exp(v); }
}

namespace mem_flags {
constexpr int mem_threadgroup = 1;
}

namespace sim {
struct Group {
  int size;
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> simd_bar;
  std::vector<float> fslot;
  std::vector<uint32_t> uslot;
};
inline Group* group = nullptr;
struct Ids {
  uint3 tpitg, tgpig;
  uint32_t lane, simd;
};
inline thread_local Ids ids;

template <typename F>
inline float simd_reduce_f(float v, F op) {
  int t = ids.simd * 32 + ids.lane;
  group->fslot[t] = v;
  group->simd_bar[ids.simd]->arrive_and_wait();
  float r = group->fslot[ids.simd * 32];
  for (int i = 1; i < 32; ++i) r = op(r, group->fslot[ids.simd * 32 + i]);
  group->simd_bar[ids.simd]->arrive_and_wait();
  return r;
}

// Runs fn once per thread of a (gx, gy) grid of threadgroups of tx threads (tx % 32 == 0).
inline void launch(int gx, int gy, int tx, const std::function<void()>& fn) {
  for (int by = 0; by < gy; ++by) {
    for (int bx = 0; bx < gx; ++bx) {
      Group g;
      g.size = tx;
      g.bar = std::make_unique<std::barrier<>>(tx);
      for (int s = 0; s < tx / 32; ++s) g.simd_bar.push_back(std::make_unique<std::barrier<>>(32));
      g.fslot.assign(tx, 0.0f);
      g.uslot.assign(tx, 0u);
      group = &g;
      std::vector<std::thread> threads;
      for (int t = 0; t < tx; ++t) {
        threads.emplace_back([=] {
          ids.tpitg = {(uint32_t)t, 0, 0};
          ids.tgpig = {(uint32_t)bx, (uint32_t)by, 0};
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

template <typename T>
std::vector<T> read(const char* path, size_t n) {
  std::vector<T> v(n);
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(v.data(), sizeof(T), n, f) != n) { std::fprintf(stderr, "cannot read %s\n", path); std::exit(2); }
  std::fclose(f);
  return v;
}
template <typename T>
void write(const char* path, const std::vector<T>& v) {
  FILE* f = std::fopen(path, "wb");
  std::fwrite(v.data(), sizeof(T), v.size(), f);
  std::fclose(f);
}
}  // namespace sim

inline void threadgroup_barrier(int) { sim::group->bar->arrive_and_wait(); }
inline float simd_sum(float v) { return sim::simd_reduce_f(v, [](float a, float b) { return a + b; }); }
inline float simd_max(float v) { return sim::simd_reduce_f(v, [](float a, float b) { return a > b ? a : b; }); }
inline uint32_t simd_min(uint32_t v) {
  int t = sim::ids.simd * 32 + sim::ids.lane;
  sim::group->uslot[t] = v;
  sim::group->simd_bar[sim::ids.simd]->arrive_and_wait();
  uint32_t r = sim::group->uslot[sim::ids.simd * 32];
  for (int i = 1; i < 32; ++i) r = std::min(r, sim::group->uslot[sim::ids.simd * 32 + i]);
  sim::group->simd_bar[sim::ids.simd]->arrive_and_wait();
  return r;
}

// The Metal attributes the kernels name, read from the running thread.
#define SIM_ATTR_thread_position_in_threadgroup sim::ids.tpitg
#define SIM_ATTR_threadgroup_position_in_grid sim::ids.tgpig
#define SIM_ATTR_thread_index_in_simdgroup sim::ids.lane
#define SIM_ATTR_simdgroup_index_in_threadgroup sim::ids.simd
