// Signature scores for the first stage of cold-token retrieval (see infinitekv/search.py for the definitions).
//
// One thread block per (query row g, chunk of tokens); row g scores kv-head (row_offset + g) % H. The weighted
// LUT of the row (B x 256 int32, built on the host so every backend sums the same integers) sits in shared
// memory; weights are float16 (the archive's index, widened exactly in the kernel) or float32. hamming uses __popc
// on 32-bit words when B % 4 == 0, else on bytes. Output: float32 [G, N - start], the top-k (with the index
// tie-break) is one torch.topk on packed keys in search.py.
//
// This file needs only the CUDA runtime, so `nvcc -c` compiles it without torch; hamming_topk_binding.cpp binds it.
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;
constexpr int kTokensPerThread = 16;  // a block scores 4096 tokens, so loading the LUT is amortised

__device__ __forceinline__ float canonical(float s) { return s == 0.0f ? 0.0f : s; }  // -0.0 -> +0.0

__device__ __forceinline__ float widen(float w) { return w; }
__device__ __forceinline__ float widen(__half w) { return __half2float(w); }  // exact

template <bool kWords, typename Weight>
__global__ void weighted_scores_kernel(const uint8_t* __restrict__ sigs, const Weight* __restrict__ weights,
                                       const int32_t* __restrict__ luts, int64_t n_tokens, int n_heads,
                                       int n_bytes, int64_t start, int64_t row_offset, float* __restrict__ out) {
  extern __shared__ int32_t lut[];  // [B, 256]
  const int g = blockIdx.y;
  const int h = static_cast<int>((row_offset + g) % n_heads);
  const int32_t* row_lut = luts + static_cast<int64_t>(g) * n_bytes * 256;
  for (int j = threadIdx.x; j < n_bytes * 256; j += blockDim.x) lut[j] = row_lut[j];
  __syncthreads();

  const int64_t n_eff = n_tokens - start;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads * kTokensPerThread;
  for (int t = 0; t < kTokensPerThread; ++t) {
    const int64_t local = first + static_cast<int64_t>(t) * kThreads + threadIdx.x;
    if (local >= n_eff) return;
    const int64_t n = start + local;
    const int64_t cell = n * n_heads + h;
    int32_t acc = 0;
    if (kWords) {
      const uint32_t* sig = reinterpret_cast<const uint32_t*>(sigs + cell * n_bytes);
      for (int w = 0; w < n_bytes / 4; ++w) {
        const uint32_t word = sig[w];
        const int32_t* l = lut + w * 4 * 256;
        acc += l[word & 0xFF] + l[256 + ((word >> 8) & 0xFF)] + l[512 + ((word >> 16) & 0xFF)] + l[768 + (word >> 24)];
      }
    } else {
      const uint8_t* sig = sigs + cell * n_bytes;
      for (int b = 0; b < n_bytes; ++b) acc += lut[b * 256 + sig[b]];
    }
    out[static_cast<int64_t>(g) * n_eff + local] = canonical(__fmul_rn(widen(weights[cell]), __int2float_rn(acc)));
  }
}

template <bool kWords>
__global__ void hamming_scores_kernel(const uint8_t* __restrict__ sigs, const uint8_t* __restrict__ qbits,
                                      int64_t n_tokens, int n_heads, int n_bytes, int64_t start,
                                      int64_t row_offset, float* __restrict__ out) {
  extern __shared__ uint32_t qwords[];  // the row's query bits, ceil(B / 4) words
  const int g = blockIdx.y;
  const int h = static_cast<int>((row_offset + g) % n_heads);
  const uint8_t* q = qbits + static_cast<int64_t>(g) * n_bytes;
  const int n_words = (n_bytes + 3) / 4;
  for (int w = threadIdx.x; w < n_words; w += blockDim.x) {
    uint32_t word = 0;
    for (int j = 0; j < 4 && 4 * w + j < n_bytes; ++j) word |= static_cast<uint32_t>(q[4 * w + j]) << (8 * j);
    qwords[w] = word;
  }
  __syncthreads();

  const int64_t n_eff = n_tokens - start;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads * kTokensPerThread;
  for (int t = 0; t < kTokensPerThread; ++t) {
    const int64_t local = first + static_cast<int64_t>(t) * kThreads + threadIdx.x;
    if (local >= n_eff) return;
    const int64_t cell = (start + local) * n_heads + h;
    int dist = 0;
    if (kWords) {
      const uint32_t* sig = reinterpret_cast<const uint32_t*>(sigs + cell * n_bytes);
      for (int w = 0; w < n_words; ++w) dist += __popc(sig[w] ^ qwords[w]);
    } else {
      const uint8_t* sig = sigs + cell * n_bytes;
      for (int b = 0; b < n_bytes; ++b) dist += __popc((sig[b] ^ (qwords[b / 4] >> (8 * (b % 4)))) & 0xFFu);
    }
    out[static_cast<int64_t>(g) * n_eff + local] = canonical(__int2float_rn(-dist));
  }
}

dim3 grid_for(int64_t n_eff, int n_rows) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kTokensPerThread;
  return dim3(static_cast<unsigned>((n_eff + per_block - 1) / per_block), static_cast<unsigned>(n_rows));
}

template <typename Weight>
cudaError_t launch_weighted(const uint8_t* sigs, const Weight* weights, const int32_t* luts, int64_t n_tokens,
                            int n_heads, int n_bytes, int64_t start, int n_rows, int64_t row_offset, float* out,
                            cudaStream_t stream) {
  if (n_tokens <= start || n_rows == 0) return cudaSuccess;
  const size_t shared = static_cast<size_t>(n_bytes) * 256 * sizeof(int32_t);
  const dim3 grid = grid_for(n_tokens - start, n_rows);
  if (n_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(sigs) % 4 == 0)
    weighted_scores_kernel<true, Weight><<<grid, kThreads, shared, stream>>>(sigs, weights, luts, n_tokens, n_heads,
                                                                              n_bytes, start, row_offset, out);
  else
    weighted_scores_kernel<false, Weight><<<grid, kThreads, shared, stream>>>(sigs, weights, luts, n_tokens, n_heads,
                                                                               n_bytes, start, row_offset, out);
  return cudaGetLastError();
}

}  // namespace

// sigs: [N, H, B] uint8; weights: [N, H] float32; luts: [G, B, 256] int32; out: [G, N - start] float32.
cudaError_t ikv_weighted_scores(const uint8_t* sigs, const float* weights, const int32_t* luts, int64_t n_tokens,
                                int n_heads, int n_bytes, int64_t start, int n_rows, int64_t row_offset, float* out,
                                cudaStream_t stream) {
  return launch_weighted(sigs, weights, luts, n_tokens, n_heads, n_bytes, start, n_rows, row_offset, out, stream);
}

// As above with weights [N, H] float16, given as their bits (the archive's index).
cudaError_t ikv_weighted_scores_half(const uint8_t* sigs, const uint16_t* weights, const int32_t* luts,
                                     int64_t n_tokens, int n_heads, int n_bytes, int64_t start, int n_rows,
                                     int64_t row_offset, float* out, cudaStream_t stream) {
  return launch_weighted(sigs, reinterpret_cast<const __half*>(weights), luts, n_tokens, n_heads, n_bytes, start,
                         n_rows, row_offset, out, stream);
}

// sigs: [N, H, B] uint8; qbits: [G, B] uint8; out: [G, N - start] float32.
cudaError_t ikv_hamming_scores(const uint8_t* sigs, const uint8_t* qbits, int64_t n_tokens, int n_heads, int n_bytes,
                               int64_t start, int n_rows, int64_t row_offset, float* out, cudaStream_t stream) {
  if (n_tokens <= start || n_rows == 0) return cudaSuccess;
  const size_t shared = static_cast<size_t>((n_bytes + 3) / 4) * sizeof(uint32_t);
  const dim3 grid = grid_for(n_tokens - start, n_rows);
  if (n_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(sigs) % 4 == 0)
    hamming_scores_kernel<true><<<grid, kThreads, shared, stream>>>(sigs, qbits, n_tokens, n_heads, n_bytes, start,
                                                                     row_offset, out);
  else
    hamming_scores_kernel<false><<<grid, kThreads, shared, stream>>>(sigs, qbits, n_tokens, n_heads, n_bytes, start,
                                                                      row_offset, out);
  return cudaGetLastError();
}
