// Two EXL2 codes per instruction into a half2 (for the batch-1 half2 gemv, exl2_gemv_half2.cu).
//
// Host and device code: tests/csrc/half2_decode_check.cu runs this on the CPU and checks every
// pair of every bit width against plain code extraction, so no GPU is needed to test the bit tricks.
//
// A tile holds 32 codes of BITS bits per column in BITS 32-bit words (code i at bits [i*BITS, i*BITS+BITS)
// of the little-endian bit stream). They are decoded as 16 pairs p = 0..15: codes lo(p) and lo(p) + dist(p).
// For each pair a 32-bit window of the stream is taken (one funnel shift, or none when it starts on a
// word boundary) so that the first code sits at bits [r, r+BITS) and the second at [16+s, 16+s+BITS),
// with r + BITS <= 10 and s + BITS <= 10: both lie inside the 10-bit mantissas of an fp16 pair.
// One AND/OR (a single LOP3) with the exponent of 1024 (0x6400) gives the half2 (1024 + q0*2^r,
// 1024 + q1*2^s) exactly, and one HFMA2 with (2^-r, 2^-s) and -(1024*2^-r + 2^(BITS-1)), ... gives the
// centred codes q - 2^(BITS-1) exactly (every intermediate is an integer below 2048). Pairs are chosen
// so that consecutive pairs share windows: 4-bit needs one shift per word, 2-bit two per word.
// 8-bit pairs are one byte permute each (bytes 0/2 or 1/3 of a word next to 0x64 bytes).
//
// The x vector is laid out to match: position 2p holds x[lo(p)], 2p+1 holds x[lo(p) + dist(p)]
// (row_of below), so a tile's 16 x pairs are 64 contiguous bytes of shared memory.

#pragma once
#include <cuda_fp16.h>
#include <cstdint>
#include <cstring>
#include <utility>

namespace kestrel {
namespace h2 {

#define KESTREL_HD __host__ __device__ __forceinline__

// Distance between the two codes of pair p (BITS * dist - 16 must fit the mantissa, see above).
__host__ __device__ constexpr int dist(int bits, int p) {
  return bits == 8 ? 2 : bits == 2 ? 8 : bits == 6 ? (p < 12 ? 3 : 2) : 4;  // 3, 4, 5 bits: 4
}

// First code of pair p: blocks of 2*dist consecutive codes, the first half paired with the second.
// 6-bit: codes 0..23 in blocks of 6 (dist 3), codes 24..31 in blocks of 4 (dist 2), since 32 is
// not a multiple of 6 and no other distance puts two 6-bit codes 16 bits apart within the mantissa.
__host__ __device__ constexpr int lo(int bits, int p) {
  return (bits == 6 && p >= 12) ? 24 + 4 * ((p - 12) / 2) + (p - 12) % 2
                                : 2 * dist(bits, p) * (p / dist(bits, p)) + p % dist(bits, p);
}

// Row of the tile whose x goes to half position pos (0..31) of the tile's shared-memory x pairs.
__host__ __device__ constexpr int row_of(int bits, int pos) {
  return lo(bits, pos >> 1) + (pos & 1) * dist(bits, pos >> 1);
}

__host__ __device__ constexpr int pmod(int a, int g) { return ((a % g) + g) % g; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }

// Bit offset r of the first code inside the window: within [r_min, r_max] (both codes inside their
// mantissa), chosen so that the window start is aligned to the largest power of two possible, which
// lets neighbouring pairs share one window.
__host__ __device__ constexpr int lo_shift(int bits, int p) {
  const int diff = dist(bits, p) * bits;
  const int r_min = imax(0, 16 - diff);
  const int r_max = imin(10 - bits, 26 - bits - diff);
  const int a = lo(bits, p) * bits;
  for (int g = 32; g > 1; g >>= 1) {
    const int r = r_min + pmod(a - r_min, g);
    if (r <= r_max) return r;
  }
  return r_min;
}
__host__ __device__ constexpr int hi_shift(int bits, int p) { return lo_shift(bits, p) + dist(bits, p) * bits - 16; }
__host__ __device__ constexpr int window_start(int bits, int p) { return lo(bits, p) * bits - lo_shift(bits, p); }

// fp16 bit pattern of an integer with |v| < 2048 (exact), and of 2^-e for 0 <= e <= 14.
__host__ __device__ constexpr uint32_t half_bits_int(int v) {
  const uint32_t sign = v < 0 ? 0x8000u : 0u;
  const int m = v < 0 ? -v : v;
  if (m == 0) return sign;
  int e = 0;
  while ((m >> (e + 1)) != 0) ++e;
  return sign | (uint32_t)(e + 15) << 10 | (((uint32_t)m << (10 - e)) & 0x3ffu);
}
__host__ __device__ constexpr uint32_t half_bits_pow2_neg(int e) { return (uint32_t)(15 - e) << 10; }

// Checks of the pair table, evaluated at compile time (static_assert below).
__host__ __device__ constexpr bool table_ok(int bits) {
  uint32_t seen = 0;
  for (int p = 0; p < 16; ++p) {
    const int a = lo(bits, p), b = a + dist(bits, p);
    const int r = lo_shift(bits, p), s = hi_shift(bits, p);
    if (a < 0 || b > 31 || r < 0 || s < 0 || r + bits > 10 || s + bits > 10) return false;
    if ((seen >> a) & 1u || (seen >> b) & 1u) return false;
    seen |= (1u << a) | (1u << b);
    if (window_start(bits, p) + 16 + s != b * bits) return false;
    if (window_start(bits, p) >= 32 * bits) return false;
  }
  return seen == 0xffffffffu;
}
static_assert(table_ok(2) && table_ok(3) && table_ok(4) && table_ok(5) && table_ok(6) && table_ok(8),
              "half2 pair table");

KESTREL_HD uint32_t funnel_r(uint32_t lo_word, uint32_t hi_word, int sh) {
#ifdef __CUDA_ARCH__
  return __funnelshift_r(lo_word, hi_word, sh);
#else
  return sh == 0 ? lo_word : (lo_word >> sh) | (hi_word << (32 - sh));
#endif
}

KESTREL_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t sel) {
#ifdef __CUDA_ARCH__
  return __byte_perm(x, y, sel);
#else
  const uint64_t v = (uint64_t)x | ((uint64_t)y << 32);
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= (uint32_t)((v >> (8 * ((sel >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
#endif
}

// Bits [START, START+32) of the tile's stream (zeros below bit 0 and above the last word).
template <int BITS, int START>
KESTREL_HD uint32_t window(const uint32_t (&w)[BITS]) {
  if constexpr (START < 0) {
    return w[0] << (-START);
  } else {
    constexpr int j = START >> 5;
    constexpr int sh = START & 31;
    if constexpr (sh == 0) {
      return w[j];
    } else if constexpr (j + 1 < BITS) {
      return funnel_r(w[j], w[j + 1], sh);
    } else {
      return w[j] >> sh;
    }
  }
}

// (a & MASK) | b as one LOP3. Written in PTX because ptxas, given two literal constants, emits an AND
// and an OR (a LOP3 has one 32-bit immediate); with the lop3 spelled out it keeps one in a register.
template <uint32_t MASK>
KESTREL_HD uint32_t and_or(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "n"(MASK), "r"(b));
  return d;
#else
  return (a & MASK) | b;
#endif
}

// Raw half2 bits of pair P: (1024 + q_lo * 2^r, 1024 + q_hi * 2^s), low half first; magic is
// 0x64006400 (the exponent of 1024 in both halves).
template <int BITS, int P>
KESTREL_HD uint32_t pair_bits(const uint32_t (&w)[BITS], uint32_t magic) {
  if constexpr (BITS == 8) {
    // pair P: bytes (P&1, (P&1)+2) of word P/2; y = 0x64 supplies the exponent bytes (selector 4)
    return byte_perm(w[P >> 1], 0x64u, (P & 1) ? 0x4341u : 0x4240u);
  } else {
    constexpr uint32_t code = (1u << BITS) - 1u;
    constexpr uint32_t mask = (code << lo_shift(BITS, P)) | (code << (16 + hi_shift(BITS, P)));
    return and_or<mask>(window<BITS, window_start(BITS, P)>(w), magic);
  }
}

// The HFMA2 that turns pair_bits into the centred codes: h * scale + bias (raw half2 bits).
template <int BITS, int P>
KESTREL_HD constexpr uint32_t pair_scale() {
  return BITS == 8 ? 0x3c003c00u
                   : half_bits_pow2_neg(lo_shift(BITS, P)) | half_bits_pow2_neg(hi_shift(BITS, P)) << 16;
}
template <int BITS, int P>
KESTREL_HD constexpr uint32_t pair_bias() {
  constexpr int off = 1 << (BITS - 1);
  return BITS == 8 ? (half_bits_int(-(1024 + off)) * 0x10001u)
                   : half_bits_int(-((1024 >> lo_shift(BITS, P)) + off)) |
                         half_bits_int(-((1024 >> hi_shift(BITS, P)) + off)) << 16;
}

#ifdef __CUDACC__
__device__ __forceinline__ half2 as_half2(uint32_t u) {
  half2 h;
  memcpy(&h, &u, sizeof(h));
  return h;
}

// Centred codes (q_lo - 2^(BITS-1), q_hi - 2^(BITS-1)) of pair P, exact.
template <int BITS, int P>
__device__ __forceinline__ half2 decode_pair(const uint32_t (&w)[BITS], uint32_t magic) {
  const half2 h = as_half2(pair_bits<BITS, P>(w, magic));
  if constexpr (pair_scale<BITS, P>() == 0x3c003c00u) {
    return __hadd2(h, as_half2(pair_bias<BITS, P>()));
  } else {
    return __hfma2(h, as_half2(pair_scale<BITS, P>()), as_half2(pair_bias<BITS, P>()));
  }
}

// sum over the tile's 32 rows of x * (q - 2^(BITS-1)) for one column, in two half2 partial sums
// (pairs 0..7 and 8..15: each lane adds 8 products), returned in fp32.
template <int BITS, int... P>
__device__ __forceinline__ float column_dot(const uint32_t (&w)[BITS], const half2 (&xv)[16],
                                            std::integer_sequence<int, P...>) {
  const uint32_t magic = 0x64006400u;
  half2 a0 = __float2half2_rn(0.f);
  half2 a1 = a0;
  ((P < 8 ? (a0 = __hfma2(decode_pair<BITS, P>(w, magic), xv[P], a0))
          : (a1 = __hfma2(decode_pair<BITS, P>(w, magic), xv[P], a1))), ...);
  const float2 f0 = __half22float2(a0);
  const float2 f1 = __half22float2(a1);
  return (f0.x + f0.y) + (f1.x + f1.y);
}
#endif

#undef KESTREL_HD

}  // namespace h2
}  // namespace kestrel
