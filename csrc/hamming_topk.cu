// Signature scores for the first stage of cold-token retrieval (see infinitekv/search.py for the definitions).
//
// One thread block per (query row g, run of 4096 tokens); row g scores kv-head (row_offset + g) % H. The index is
// head-major, [H, capacity, B] signatures and [H, capacity] weights (search.ResidentIndex keeps it on the device and
// appends to it as tokens spill), so a warp reads consecutive signatures. The weighted LUT of the row (B x 256
// int32, built on the host so every backend sums the same integers) sits in shared memory; weights are float16 (the
// archive's index, widened exactly) or float32. hamming uses popcount on 32-bit words when B % 4 == 0, else on
// bytes. What a thread computes is in signature_score.h, shared with the CPU test. Output: float32
// [G, N - start]; the top-k (with the index tie-break) is one torch.topk on packed keys in search.py.
//
// This file needs only the CUDA runtime, so `nvcc -c` compiles it without torch; hamming_topk_binding.cpp binds it.
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "signature_score.h"

namespace {

template <bool kWords, typename Weight>
__global__ void weighted_scores_kernel(ikv::Scan scan, const Weight* __restrict__ weights,
                                       const int32_t* __restrict__ luts) {
  extern __shared__ int32_t lut[];  // [B, 256]
  const int g = blockIdx.y;
  const int32_t* row_lut = luts + static_cast<int64_t>(g) * scan.n_bytes * 256;
  for (int j = threadIdx.x; j < scan.n_bytes * 256; j += blockDim.x) lut[j] = row_lut[j];
  __syncthreads();
  ikv::weighted_thread<kWords>(scan, weights, lut, g, blockIdx.x, threadIdx.x);
}

template <bool kWords>
__global__ void hamming_scores_kernel(ikv::Scan scan, const uint8_t* __restrict__ qbits) {
  extern __shared__ uint32_t qwords[];  // the row's query bits, ceil(B / 4) words
  const int g = blockIdx.y;
  const int n_words = (scan.n_bytes + 3) / 4;
  for (int w = threadIdx.x; w < n_words; w += blockDim.x)
    qwords[w] = ikv::query_word(qbits + static_cast<int64_t>(g) * scan.n_bytes, w, scan.n_bytes);
  __syncthreads();
  ikv::hamming_thread<kWords>(scan, qwords, g, blockIdx.x, threadIdx.x);
}

bool words_fit(const ikv::Scan& scan) {
  return scan.n_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(scan.sigs) % 4 == 0;
}

dim3 grid_for(const ikv::Scan& scan, int n_rows) {
  return dim3(static_cast<unsigned>(ikv::blocks_for(scan.n_tokens - scan.start)), static_cast<unsigned>(n_rows));
}

template <typename Weight>
cudaError_t launch_weighted(const ikv::Scan& scan, const Weight* weights, const int32_t* luts, int n_rows,
                            cudaStream_t stream) {
  if (scan.n_tokens <= scan.start || n_rows == 0) return cudaSuccess;
  const size_t shared = static_cast<size_t>(scan.n_bytes) * 256 * sizeof(int32_t);
  if (words_fit(scan))
    weighted_scores_kernel<true, Weight><<<grid_for(scan, n_rows), ikv::kThreads, shared, stream>>>(scan, weights,
                                                                                                   luts);
  else
    weighted_scores_kernel<false, Weight><<<grid_for(scan, n_rows), ikv::kThreads, shared, stream>>>(scan, weights,
                                                                                                    luts);
  return cudaGetLastError();
}

}  // namespace

// sigs: [H, capacity, B] uint8 (tokens 0..n_tokens-1 valid); weights: [H, capacity] float32; luts: [G, B, 256]
// int32; out: [G, n_tokens - start] float32.
cudaError_t ikv_weighted_scores(const ikv::Scan& scan, const float* weights, const int32_t* luts, int n_rows,
                                cudaStream_t stream) {
  return launch_weighted(scan, weights, luts, n_rows, stream);
}

// As above with weights [H, capacity] float16, given as their bits (the archive's index).
cudaError_t ikv_weighted_scores_half(const ikv::Scan& scan, const uint16_t* weights, const int32_t* luts, int n_rows,
                                     cudaStream_t stream) {
  return launch_weighted(scan, reinterpret_cast<const __half*>(weights), luts, n_rows, stream);
}

// qbits: [G, B] uint8; out: [G, n_tokens - start] float32.
cudaError_t ikv_hamming_scores(const ikv::Scan& scan, const uint8_t* qbits, int n_rows, cudaStream_t stream) {
  if (scan.n_tokens <= scan.start || n_rows == 0) return cudaSuccess;
  const size_t shared = static_cast<size_t>((scan.n_bytes + 3) / 4) * sizeof(uint32_t);
  if (words_fit(scan))
    hamming_scores_kernel<true><<<grid_for(scan, n_rows), ikv::kThreads, shared, stream>>>(scan, qbits);
  else
    hamming_scores_kernel<false><<<grid_for(scan, n_rows), ikv::kThreads, shared, stream>>>(scan, qbits);
  return cudaGetLastError();
}
