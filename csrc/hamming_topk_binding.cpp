// Torch binding for hamming_topk.cu: checks shapes and devices, allocates the scores, launches on the current stream.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "signature_score.h"

cudaError_t ikv_weighted_scores(const ikv::Scan& scan, const float* weights, const int32_t* luts, int n_rows,
                                cudaStream_t stream);
cudaError_t ikv_weighted_scores_half(const ikv::Scan& scan, const uint16_t* weights, const int32_t* luts, int n_rows,
                                     cudaStream_t stream);
cudaError_t ikv_hamming_scores(const ikv::Scan& scan, const uint8_t* qbits, int n_rows, cudaStream_t stream);

namespace {

// sigs: [H, capacity, B] uint8, head-major; tokens 0..n_tokens-1 are valid
ikv::Scan scan_of(const torch::Tensor& sigs, int64_t n_tokens, int64_t start, int64_t row_offset,
                  const torch::Tensor& out) {
  TORCH_CHECK(sigs.is_cuda() && sigs.is_contiguous(), "signatures must be a contiguous CUDA tensor");
  TORCH_CHECK(sigs.scalar_type() == torch::kUInt8 && sigs.dim() == 3, "signatures must be uint8 [H, capacity, B]");
  TORCH_CHECK(n_tokens >= 0 && n_tokens <= sigs.size(1), "n_tokens must be in [0, capacity]");
  TORCH_CHECK(start >= 0 && start <= n_tokens, "start must be in [0, n_tokens]");
  TORCH_CHECK(row_offset >= 0, "row_offset must be >= 0");
  return ikv::Scan{sigs.data_ptr<uint8_t>(), n_tokens, sigs.size(1), static_cast<int>(sigs.size(0)),
                   static_cast<int>(sigs.size(2)), start, row_offset, out.data_ptr<float>()};
}

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "ikv kernel launch: ", cudaGetErrorString(err)); }

}  // namespace

// weights: [H, capacity] float16 (the archive's index) or float32; luts: [G, B, 256] int32 (row g is for head
// (row_offset + g) % H) -> [G, n_tokens - start]
torch::Tensor weighted_scores(torch::Tensor sigs, torch::Tensor weights, torch::Tensor luts, int64_t n_tokens,
                              int64_t start, int64_t row_offset) {
  const bool half = weights.scalar_type() == torch::kHalf;
  TORCH_CHECK(weights.is_cuda() && weights.is_contiguous() && (half || weights.scalar_type() == torch::kFloat32) &&
                  weights.dim() == 2 && weights.size(0) == sigs.size(0) && weights.size(1) == sigs.size(1),
              "weights must be a contiguous CUDA float16 or float32 [H, capacity] tensor");
  TORCH_CHECK(luts.is_cuda() && luts.is_contiguous() && luts.scalar_type() == torch::kInt32 && luts.dim() == 3 &&
                  luts.size(1) == sigs.size(2) && luts.size(2) == 256,
              "luts must be a contiguous CUDA int32 [G, B, 256] tensor");
  TORCH_CHECK(sigs.size(2) * 256 * 4 <= 48 * 1024, "weighted scores need B <= 48 (head_dim <= 384)");
  TORCH_CHECK(luts.size(0) <= 65535, "at most 65535 query rows per call");
  const c10::cuda::CUDAGuard guard(sigs.device());
  auto out = torch::empty({luts.size(0), n_tokens - start}, sigs.options().dtype(torch::kFloat32));
  const ikv::Scan scan = scan_of(sigs, n_tokens, start, row_offset, out);
  const int g = static_cast<int>(luts.size(0));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (half)
    check_launch(ikv_weighted_scores_half(scan, static_cast<const uint16_t*>(weights.data_ptr()),
                                          luts.data_ptr<int32_t>(), g, stream));
  else
    check_launch(ikv_weighted_scores(scan, weights.data_ptr<float>(), luts.data_ptr<int32_t>(), g, stream));
  return out;
}

// qbits: [G, B] uint8 (row g is for head (row_offset + g) % H) -> [G, n_tokens - start]
torch::Tensor hamming_scores(torch::Tensor sigs, torch::Tensor qbits, int64_t n_tokens, int64_t start,
                             int64_t row_offset) {
  TORCH_CHECK(qbits.is_cuda() && qbits.is_contiguous() && qbits.scalar_type() == torch::kUInt8 && qbits.dim() == 2 &&
                  qbits.size(1) == sigs.size(2),
              "qbits must be a contiguous CUDA uint8 [G, B] tensor");
  TORCH_CHECK(qbits.size(0) <= 65535, "at most 65535 query rows per call");
  const c10::cuda::CUDAGuard guard(sigs.device());
  auto out = torch::empty({qbits.size(0), n_tokens - start}, sigs.options().dtype(torch::kFloat32));
  const ikv::Scan scan = scan_of(sigs, n_tokens, start, row_offset, out);
  check_launch(ikv_hamming_scores(scan, qbits.data_ptr<uint8_t>(), static_cast<int>(qbits.size(0)),
                                  c10::cuda::getCurrentCUDAStream()));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weighted_scores", &weighted_scores, "float32 [G, n_tokens - start] weighted signature scores");
  m.def("hamming_scores", &hamming_scores, "float32 [G, n_tokens - start] negated Hamming distances");
}
