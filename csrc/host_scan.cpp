// The scan kernels' grid run on the host: every (block, row, thread) calls the same per-thread code as
// hamming_topk.cu (signature_score.h), so tests/test_search.py checks the kernel's arithmetic and indexing against
// the numpy reference on a machine with a C++ compiler and no GPU. Built with `c++ -O2 -shared -fPIC`.
#include <cstdint>
#include <vector>

#include "signature_score.h"

namespace {

template <bool kWords>
void weighted_grid(const ikv::Scan& scan, const float* weights, const int32_t* luts, int n_rows) {
  for (int g = 0; g < n_rows; ++g)
    for (int64_t block = 0; block < ikv::blocks_for(scan.n_tokens - scan.start); ++block)
      for (int thread = 0; thread < ikv::kThreads; ++thread)
        ikv::weighted_thread<kWords>(scan, weights, luts + static_cast<int64_t>(g) * scan.n_bytes * 256, g, block,
                                     thread);
}

template <bool kWords>
void hamming_grid(const ikv::Scan& scan, const uint8_t* qbits, int n_rows) {
  std::vector<uint32_t> qwords((scan.n_bytes + 3) / 4);
  for (int g = 0; g < n_rows; ++g) {
    for (int w = 0; w < static_cast<int>(qwords.size()); ++w)
      qwords[w] = ikv::query_word(qbits + static_cast<int64_t>(g) * scan.n_bytes, w, scan.n_bytes);
    for (int64_t block = 0; block < ikv::blocks_for(scan.n_tokens - scan.start); ++block)
      for (int thread = 0; thread < ikv::kThreads; ++thread)
        ikv::hamming_thread<kWords>(scan, qwords.data(), g, block, thread);
  }
}

}  // namespace

// Arguments as the kernels take them (weights widened to float32 by the caller); words: the 32-bit-word path.
extern "C" void ikv_host_weighted_scores(const uint8_t* sigs, int64_t n_tokens, int64_t capacity, int n_heads,
                                         int n_bytes, int64_t start, int64_t row_offset, const float* weights,
                                         const int32_t* luts, int n_rows, int words, float* out) {
  const ikv::Scan scan{sigs, n_tokens, capacity, n_heads, n_bytes, start, row_offset, out};
  if (words)
    weighted_grid<true>(scan, weights, luts, n_rows);
  else
    weighted_grid<false>(scan, weights, luts, n_rows);
}

extern "C" void ikv_host_hamming_scores(const uint8_t* sigs, int64_t n_tokens, int64_t capacity, int n_heads,
                                        int n_bytes, int64_t start, int64_t row_offset, const uint8_t* qbits,
                                        int n_rows, int words, float* out) {
  const ikv::Scan scan{sigs, n_tokens, capacity, n_heads, n_bytes, start, row_offset, out};
  if (words)
    hamming_grid<true>(scan, qbits, n_rows);
  else
    hamming_grid<false>(scan, qbits, n_rows);
}
