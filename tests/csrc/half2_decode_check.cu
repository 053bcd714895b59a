// CPU check of the half2 pair decoding (app/engine/csrc/exl2_half2_decode.cuh); no GPU needed.
// Built and run by tests/test_half2_decode.py with `nvcc` (host code only). For every bit width and
// random tiles: each pair's raw half2 bits, put through the kernel's HFMA2 (evaluated exactly in
// double: every result is an integer below 2048, so fp16 represents it and the fused op is exact),
// give the centred codes that plain extraction gives, and the x layout (row_of) lines every code up
// with its own row of x. Prints "ok" and exits 0, or prints the first mismatch and exits 1.

#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <utility>

#include "exl2_half2_decode.cuh"

using namespace kestrel::h2;

static double half_value(uint32_t bits16) {
  const int sign = (bits16 >> 15) & 1, e = (bits16 >> 10) & 31, m = bits16 & 1023;
  const double v = e == 0 ? std::ldexp((double)m, -24) : std::ldexp(1.0 + m / 1024.0, e - 15);
  return sign ? -v : v;
}

static uint32_t rng_state = 12345u;
static uint32_t next_u32() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 17;
  rng_state ^= rng_state << 5;
  return rng_state;
}

template <int BITS>
static int code_plain(const uint32_t (&w)[BITS], int i) {
  uint64_t v = 0;
  const int bit = i * BITS;
  for (int b = 0; b < BITS; ++b) v |= (uint64_t)((w[(bit + b) >> 5] >> ((bit + b) & 31)) & 1u) << b;
  return (int)v;
}

static int failures = 0;

template <int BITS, int P>
static void check_pair(const uint32_t (&w)[BITS], const double (&x)[32], double& dot) {
  const uint32_t h = pair_bits<BITS, P>(w, 0x64006400u);
  const uint32_t sc = pair_scale<BITS, P>(), bi = pair_bias<BITS, P>();
  const int off = 1 << (BITS - 1);
  for (int lane = 0; lane < 2; ++lane) {
    const double v = half_value((h >> (16 * lane)) & 0xffffu) * half_value((sc >> (16 * lane)) & 0xffffu) +
                     half_value((bi >> (16 * lane)) & 0xffffu);
    const int row = lo(BITS, P) + lane * dist(BITS, P);
    const int want = code_plain<BITS>(w, row) - off;
    if (v != (double)want && failures++ < 10)
      std::printf("bits %d pair %d lane %d: decoded %g, want %d (raw %08x)\n", BITS, P, lane, v, want, h);
    if (row_of(BITS, 2 * P + lane) != row && failures++ < 10)
      std::printf("bits %d pair %d lane %d: row_of %d, want %d\n", BITS, P, lane, row_of(BITS, 2 * P + lane), row);
    dot += v * x[row_of(BITS, 2 * P + lane)];
  }
}

template <int BITS, int... P>
static void check_bits(std::integer_sequence<int, P...>) {
  for (int trial = 0; trial < 20000; ++trial) {
    uint32_t w[BITS];
    for (int j = 0; j < BITS; ++j) w[j] = trial == 0 ? 0u : trial == 1 ? 0xffffffffu : next_u32();
    double x[32];
    for (int i = 0; i < 32; ++i) x[i] = (double)((int)(next_u32() % 2001) - 1000);  // integers: sums exact
    double dot = 0.0;
    (check_pair<BITS, P>(w, x, dot), ...);
    double want = 0.0;
    for (int i = 0; i < 32; ++i) want += (code_plain<BITS>(w, i) - (1 << (BITS - 1))) * x[i];
    if (dot != want && failures++ < 10) std::printf("bits %d: tile dot %g, want %g\n", BITS, dot, want);
  }
}

int main() {
  const auto pairs = std::make_integer_sequence<int, 16>{};
  check_bits<2>(pairs);
  check_bits<3>(pairs);
  check_bits<4>(pairs);
  check_bits<5>(pairs);
  check_bits<6>(pairs);
  check_bits<8>(pairs);
  if (failures) {
    std::printf("%d mismatches\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
