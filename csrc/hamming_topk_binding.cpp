// Torch binding for hamming_topk.cu: checks shapes and devices, allocates the scores, launches on the current stream.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

cudaError_t ikv_weighted_scores(const uint8_t* sigs, const float* weights, const int32_t* luts, int64_t n_tokens,
                                int n_heads, int n_bytes, int64_t start, int n_rows, int64_t row_offset, float* out,
                                cudaStream_t stream);
cudaError_t ikv_weighted_scores_half(const uint8_t* sigs, const uint16_t* weights, const int32_t* luts,
                                     int64_t n_tokens, int n_heads, int n_bytes, int64_t start, int n_rows,
                                     int64_t row_offset, float* out, cudaStream_t stream);
cudaError_t ikv_hamming_scores(const uint8_t* sigs, const uint8_t* qbits, int64_t n_tokens, int n_heads, int n_bytes,
                               int64_t start, int n_rows, int64_t row_offset, float* out, cudaStream_t stream);

namespace {

void check_signatures(const torch::Tensor& sigs, int64_t start) {
  TORCH_CHECK(sigs.is_cuda() && sigs.is_contiguous(), "signatures must be a contiguous CUDA tensor");
  TORCH_CHECK(sigs.scalar_type() == torch::kUInt8 && sigs.dim() == 3, "signatures must be uint8 [N, H, B]");
  TORCH_CHECK(start >= 0 && start <= sigs.size(0), "start must be in [0, N]");
}

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "ikv kernel launch: ", cudaGetErrorString(err)); }

}  // namespace

// weights: [N, H] float16 (the archive's index) or float32; luts: [G, B, 256] int32 (row g is for head
// (row_offset + g) % H) -> [G, N - start]
torch::Tensor weighted_scores(torch::Tensor sigs, torch::Tensor weights, torch::Tensor luts, int64_t start,
                              int64_t row_offset) {
  check_signatures(sigs, start);
  const int64_t n = sigs.size(0), h = sigs.size(1), b = sigs.size(2);
  const bool half = weights.scalar_type() == torch::kHalf;
  TORCH_CHECK(weights.is_cuda() && weights.is_contiguous() && (half || weights.scalar_type() == torch::kFloat32) &&
                  weights.dim() == 2 && weights.size(0) == n && weights.size(1) == h,
              "weights must be a contiguous CUDA float16 or float32 [N, H] tensor");
  TORCH_CHECK(luts.is_cuda() && luts.is_contiguous() && luts.scalar_type() == torch::kInt32 && luts.dim() == 3 &&
                  luts.size(1) == b && luts.size(2) == 256,
              "luts must be a contiguous CUDA int32 [G, B, 256] tensor");
  TORCH_CHECK(b * 256 * 4 <= 48 * 1024, "weighted scores need B <= 48 (head_dim <= 384)");
  TORCH_CHECK(luts.size(0) <= 65535, "at most 65535 query rows per call");
  const c10::cuda::CUDAGuard guard(sigs.device());
  auto out = torch::empty({luts.size(0), n - start}, sigs.options().dtype(torch::kFloat32));
  const int g = static_cast<int>(luts.size(0));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (half)
    check_launch(ikv_weighted_scores_half(sigs.data_ptr<uint8_t>(), static_cast<const uint16_t*>(weights.data_ptr()),
                                          luts.data_ptr<int32_t>(), n, static_cast<int>(h), static_cast<int>(b), start,
                                          g, row_offset, out.data_ptr<float>(), stream));
  else
    check_launch(ikv_weighted_scores(sigs.data_ptr<uint8_t>(), weights.data_ptr<float>(), luts.data_ptr<int32_t>(), n,
                                     static_cast<int>(h), static_cast<int>(b), start, g, row_offset,
                                     out.data_ptr<float>(), stream));
  return out;
}

// qbits: [G, B] uint8 (row g is for head (row_offset + g) % H) -> [G, N - start]
torch::Tensor hamming_scores(torch::Tensor sigs, torch::Tensor qbits, int64_t start, int64_t row_offset) {
  check_signatures(sigs, start);
  const int64_t n = sigs.size(0), h = sigs.size(1), b = sigs.size(2);
  TORCH_CHECK(qbits.is_cuda() && qbits.is_contiguous() && qbits.scalar_type() == torch::kUInt8 && qbits.dim() == 2 &&
                  qbits.size(1) == b,
              "qbits must be a contiguous CUDA uint8 [G, B] tensor");
  TORCH_CHECK(qbits.size(0) <= 65535, "at most 65535 query rows per call");
  const c10::cuda::CUDAGuard guard(sigs.device());
  auto out = torch::empty({qbits.size(0), n - start}, sigs.options().dtype(torch::kFloat32));
  check_launch(ikv_hamming_scores(sigs.data_ptr<uint8_t>(), qbits.data_ptr<uint8_t>(), n, static_cast<int>(h),
                                  static_cast<int>(b), start, static_cast<int>(qbits.size(0)), row_offset,
                                  out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weighted_scores", &weighted_scores, "float32 [G, N - start] weighted signature scores");
  m.def("hamming_scores", &hamming_scores, "float32 [G, N - start] negated Hamming distances");
}
