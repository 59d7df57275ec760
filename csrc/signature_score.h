// What one thread of the signature-scan kernels computes for one token: plain C++ that nvcc compiles for the GPU
// and any C++ compiler for the host, so a CPU test (tests/test_search.py) runs this exact code against the numpy
// reference where no GPU is present.
//
// Layout on the device (head-major, as the resident index holds it): signatures [H, capacity, B] uint8, weights
// [H, capacity]; token n of kv-head h is cell h * capacity + n. Tokens of one head are contiguous, so a warp's
// threads read consecutive signatures.
#pragma once
#include <cstdint>
#ifdef __CUDACC__
#include <cuda_fp16.h>
#endif

#ifdef __CUDACC__
#define IKV_HD __host__ __device__ __forceinline__
#else
#define IKV_HD inline
#endif

namespace ikv {

constexpr int kThreads = 256;
constexpr int kTokensPerThread = 16;  // a block scores 4096 tokens of one row, so loading its LUT is amortised

IKV_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

IKV_HD float canonical(float s) { return s == 0.0f ? 0.0f : s; }  // -0.0 -> +0.0: equal scores, equal bits

IKV_HD float weighted(float weight, int32_t isum) {  // |isum| <= 2**24: exact in float32, one rounding
#if defined(__CUDA_ARCH__)
  return canonical(__fmul_rn(weight, __int2float_rn(isum)));
#else
  return canonical(weight * static_cast<float>(isum));
#endif
}

IKV_HD int64_t cell(int h, int64_t n, int64_t capacity) { return static_cast<int64_t>(h) * capacity + n; }

// The local token (n - start) thread `thread` of block `block` scores at step t, or -1 past the end.
IKV_HD int64_t token_of(int64_t block, int thread, int t, int64_t n_eff) {
  const int64_t local = block * kThreads * kTokensPerThread + static_cast<int64_t>(t) * kThreads + thread;
  return local < n_eff ? local : -1;
}

// sum over the signature's bytes of the row's LUT entry for that byte's value; lut: [B, 256]
template <bool kWords>
IKV_HD int32_t lut_sum(const uint8_t* sig, const int32_t* lut, int n_bytes) {
  int32_t acc = 0;
  if (kWords) {  // B % 4 == 0 and sig 4-byte aligned: one 32-bit load per 4 bytes
    const uint32_t* words = reinterpret_cast<const uint32_t*>(sig);
    for (int w = 0; w < n_bytes / 4; ++w) {
      const uint32_t word = words[w];
      const int32_t* l = lut + w * 4 * 256;
      acc += l[word & 0xFF] + l[256 + ((word >> 8) & 0xFF)] + l[512 + ((word >> 16) & 0xFF)] + l[768 + (word >> 24)];
    }
  } else {
    for (int b = 0; b < n_bytes; ++b) acc += lut[b * 256 + sig[b]];
  }
  return acc;
}

// popcount(sig XOR query bits); qwords: the query's bits as ceil(B / 4) little-endian words
template <bool kWords>
IKV_HD int hamming(const uint8_t* sig, const uint32_t* qwords, int n_bytes) {
  int dist = 0;
  if (kWords) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(sig);
    for (int w = 0; w < n_bytes / 4; ++w) dist += popcount32(words[w] ^ qwords[w]);
  } else {
    for (int b = 0; b < n_bytes; ++b) dist += popcount32((sig[b] ^ (qwords[b / 4] >> (8 * (b % 4)))) & 0xFFu);
  }
  return dist;
}

IKV_HD float to_float(float w) { return w; }
#ifdef __CUDACC__
IKV_HD float to_float(__half w) { return __half2float(w); }  // exact widening
#endif

// Where a scan reads and writes: row g of the G query rows scores kv-head (row_offset + g) % H over tokens
// start..n_tokens-1 into out[g, n - start] (float32 [G, n_tokens - start]).
struct Scan {
  const uint8_t* sigs;  // [H, capacity, B]
  int64_t n_tokens, capacity;
  int n_heads, n_bytes;
  int64_t start, row_offset;
  float* out;
};

// One thread's work in the weighted kernel: its tokens of block `block` for row g, whose LUT [B, 256] is `lut`.
template <bool kWords, typename Weight>
IKV_HD void weighted_thread(const Scan& s, const Weight* weights, const int32_t* lut, int g, int64_t block,
                            int thread) {
  const int h = static_cast<int>((s.row_offset + g) % s.n_heads);
  const int64_t n_eff = s.n_tokens - s.start;
  for (int t = 0; t < kTokensPerThread; ++t) {
    const int64_t local = token_of(block, thread, t, n_eff);
    if (local < 0) return;
    const int64_t c = cell(h, s.start + local, s.capacity);
    const int32_t isum = lut_sum<kWords>(s.sigs + c * s.n_bytes, lut, s.n_bytes);
    s.out[static_cast<int64_t>(g) * n_eff + local] = weighted(to_float(weights[c]), isum);
  }
}

// One thread's work in the hamming kernel; qwords: row g's query bits.
template <bool kWords>
IKV_HD void hamming_thread(const Scan& s, const uint32_t* qwords, int g, int64_t block, int thread) {
  const int h = static_cast<int>((s.row_offset + g) % s.n_heads);
  const int64_t n_eff = s.n_tokens - s.start;
  for (int t = 0; t < kTokensPerThread; ++t) {
    const int64_t local = token_of(block, thread, t, n_eff);
    if (local < 0) return;
    const int64_t c = cell(h, s.start + local, s.capacity);
    s.out[static_cast<int64_t>(g) * n_eff + local] =
        canonical(static_cast<float>(-hamming<kWords>(s.sigs + c * s.n_bytes, qwords, s.n_bytes)));
  }
}

// The query bits of one row as little-endian words (ceil(B / 4) of them).
IKV_HD uint32_t query_word(const uint8_t* qbits, int w, int n_bytes) {
  uint32_t word = 0;
  for (int j = 0; j < 4 && 4 * w + j < n_bytes; ++j) word |= static_cast<uint32_t>(qbits[4 * w + j]) << (8 * j);
  return word;
}

IKV_HD int64_t blocks_for(int64_t n_eff) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kTokensPerThread;
  return (n_eff + per_block - 1) / per_block;
}

}  // namespace ikv
