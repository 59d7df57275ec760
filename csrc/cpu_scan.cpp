// The weighted signature scan on the CPU, 64 tokens at a time with AVX-512 VBMI byte lookups.
// infinitekv/cpu_scan.py builds it on first use and loads it with ctypes; search.py's numba kernels run instead where
// the CPU lacks the instructions, no compiler is found, or the shapes are outside what this file handles.
//
// Scores are bit for bit those of search.py's weighted mode (tests/test_cpu_scan.py checks them against the numpy
// reference), for query row g, kv-head h = g % H, token t:
//     score[g, t] = float32(weight[t, h]) * float32(sum_j lut[g][256 j + sig[t, h, j]]) + 0.0f
// Why it is faster than the numba loop: that loop is bound by one scalar table load per signature byte. Here the
// bytes of 64 tokens are transposed to byte-major registers (byte j of token m in lane m) and looked up 64 at a
// time with vpermi2b in 128-byte halves of a 256-entry table. The tables hold int32 sums of eight query integers
// (|entry| <= 2**19), so each is stored biased as three byte planes, the planes summed in 16-bit lanes (at most
// 255 per byte, < 2**16 for B <= 256) and recombined into exact int32 sums.
//
// Layout as the archive's index holds it: signatures [N, H, B] uint8 token-major, weights [N, H] float16 bits.
// Handles B a multiple of 8 up to 32 (head_dim 64 to 256) and H * B / 8 <= kMaxWords; cpu_scan.py checks both.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define IKV_SIMD 1
#define IKV_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi,f16c")))
#else
#define IKV_SIMD 0
#endif

namespace {

constexpr int kGroup = 64;         // tokens per vector pass: one byte lane each
constexpr int kBlock = 1024;       // tokens scored per row before the top-k compare (search.SCORE_BLOCK)
constexpr int kMaxWords = 16;      // H * B / 8: the 8-byte words of one token across all kv-heads
constexpr int kMaxWordsPerHead = 4;
constexpr int32_t kBias = 1 << 20;  // |lut entry| <= 2**19: biased entries lie in [0, 2**21), three bytes

struct Index {
  const uint8_t* sigs;      // [N, H, B]
  const uint16_t* weights;  // [N, H] float16 bits
  int64_t n_tokens;
  int n_heads, n_bytes;
};

// The best k (score, token) of a stream met in token order, ties to the lower token: candidates above the floor go
// to a buffer of 2k, cut back to the best k whenever it fills, the floor then rising to the k-th best score. A token
// equal to the floor comes after every kept one, so it loses the tie and is left out. (An append costs a few ns where
// a heap's sift costs ~80; the order of the kept k is left to the caller's merge.)
struct Best {
  struct Entry {
    float score;
    int64_t token;
  };
  std::vector<Entry> kept;
  int64_t k;
  float floor = -std::numeric_limits<float>::infinity();

  explicit Best(int64_t k) : k(k) { kept.reserve(2 * k); }
  void offer(float score, int64_t token) {
    kept.push_back({score, token});
    if (static_cast<int64_t>(kept.size()) == 2 * k) cut();
  }
  void cut() {
    if (static_cast<int64_t>(kept.size()) <= k) return;
    std::nth_element(kept.begin(), kept.begin() + (k - 1), kept.end(), [](const Entry& a, const Entry& b) {
      return a.score > b.score || (a.score == b.score && a.token < b.token);
    });
    floor = kept[k - 1].score;
    kept.resize(k);
  }
};

#if IKV_SIMD

// Every LUT row as byte planes: plane p of entry b is byte p of (lut + kBias), 64-byte aligned for vector loads.
struct Planes {
  uint8_t* data = nullptr;  // [G][B][3][256]
  int n_rows = 0, n_bytes = 0;
  ~Planes() { std::free(data); }
  uint8_t* at(int g, int j, int p) const { return data + ((static_cast<int64_t>(g) * n_bytes + j) * 3 + p) * 256; }
};

bool build_planes(const int32_t* luts, int n_rows, int n_bytes, Planes& planes) {
  const int64_t size = static_cast<int64_t>(n_rows) * n_bytes * 3 * 256;
  planes.data = static_cast<uint8_t*>(std::aligned_alloc(64, size));
  if (planes.data == nullptr) return false;
  planes.n_rows = n_rows;
  planes.n_bytes = n_bytes;
  for (int g = 0; g < n_rows; ++g)
    for (int j = 0; j < n_bytes; ++j)
      for (int b = 0; b < 256; ++b) {
        const int64_t v = static_cast<int64_t>(luts[(static_cast<int64_t>(g) * n_bytes + j) * 256 + b]) + kBias;
        if (v < 0 || v >= (1 << 24)) return false;
        for (int p = 0; p < 3; ++p) planes.at(g, j, p)[b] = static_cast<uint8_t>(v >> (8 * p));
      }
  return true;
}

// Moving lanes between registers: output lane l takes lane idx[l] of the pair (reg, reg + 1) where mask has bit l.
// A token's words (or weights) are strided across several registers; a few of these picks assemble one column.
struct Pick {
  int reg;
  __m512i idx;
  uint32_t mask;
};

struct Recipe {  // the picks that gather one column: at most one per pair of source registers
  Pick picks[kMaxWords / 2 + 2];
  int n = 0;
};

// Lane l (of `lanes`) reads element l * stride + column of a sequence split into registers of `per_reg` elements.
Recipe make_recipe(int lanes, int per_reg, int stride, int column) {
  Recipe r;
  const int first = column / per_reg, last = ((lanes - 1) * stride + column) / per_reg;
  for (int reg = first; reg <= last; reg += 2) {
    alignas(64) uint16_t idx16[32] = {};
    alignas(64) int64_t idx64[8] = {};
    uint32_t mask = 0;
    for (int l = 0; l < lanes; ++l) {
      const int source = l * stride + column, at = source / per_reg;
      if (at != reg && at != reg + 1) continue;
      mask |= 1u << l;
      if (per_reg == 8) idx64[l] = source - 8 * reg;
      else idx16[l] = static_cast<uint16_t>(source - 32 * reg);
    }
    std::memcpy(&r.picks[r.n].idx, per_reg == 8 ? static_cast<void*>(idx64) : static_cast<void*>(idx16), 64);
    r.picks[r.n].reg = reg;  // the pair's second register is clipped to the last one where reg is the last
    r.picks[r.n].mask = mask;
    ++r.n;
  }
  return r;
}

struct Scanner {
  Index index;
  const Planes* planes;
  int words_per_head;        // B / 8
  int words;                 // H * B / 8: qwords per token
  Recipe word_recipes[kMaxWords];      // column h * words_per_head + w: word w of head h, 8 tokens per register
  Recipe weight_recipes[kMaxWords][2];  // head h, tokens 0-31 or 32-63, from the group's 64 * H halves
};

IKV_TARGET inline __m512i gather_words(const Recipe& r, const __m512i* regs, int n_regs) {
  __m512i out = _mm512_setzero_si512();
  for (int p = 0; p < r.n; ++p) {
    const Pick& pick = r.picks[p];
    const __m512i pair = _mm512_permutex2var_epi64(regs[pick.reg], pick.idx, regs[std::min(pick.reg + 1, n_regs - 1)]);
    out = _mm512_mask_blend_epi64(static_cast<__mmask8>(pick.mask), out, pair);
  }
  return out;
}

IKV_TARGET inline __m512i gather_halves(const Recipe& r, const __m512i* regs, int n_regs) {
  __m512i out = _mm512_setzero_si512();
  for (int p = 0; p < r.n; ++p) {
    const Pick& pick = r.picks[p];
    const __m512i pair = _mm512_permutex2var_epi16(regs[pick.reg], pick.idx, regs[std::min(pick.reg + 1, n_regs - 1)]);
    out = _mm512_mask_blend_epi16(pick.mask, out, pair);
  }
  return out;
}

// Byte j of the 64 tokens' word (h, w), token m in lane m, into x[j]; group: the 64 tokens' qwords, token-major.
IKV_TARGET void transpose_word(const Scanner& sc, const uint64_t* group, int column, __m512i* x) {
  alignas(64) static const uint8_t kByteMajor[64] = {  // 8 qwords (token t, byte j) -> lane 8 j + t
      0, 8,  16, 24, 32, 40, 48, 56, 1, 9,  17, 25, 33, 41, 49, 57, 2, 10, 18, 26, 34, 42, 50, 58,
      3, 11, 19, 27, 35, 43, 51, 59, 4, 12, 20, 28, 36, 44, 52, 60, 5, 13, 21, 29, 37, 45, 53, 61,
      6, 14, 22, 30, 38, 46, 54, 62, 7, 15, 23, 31, 39, 47, 55, 63};
  const __m512i byte_major = _mm512_load_si512(kByteMajor);
  __m512i y[8];
  __m512i regs[kMaxWords];
  for (int k = 0; k < 8; ++k) {  // tokens 8k .. 8k+7: their words span `words` registers
    const uint64_t* base = group + static_cast<int64_t>(8 * k) * sc.words;
    for (int r = 0; r < sc.words; ++r) regs[r] = _mm512_loadu_si512(base + 8 * r);
    y[k] = _mm512_permutexvar_epi8(byte_major, gather_words(sc.word_recipes[column], regs, sc.words));
  }
  // 8 x 8 transpose of qwords: x[j] qword k = y[k] qword j, so x[j] byte 8k + t = byte j of token 8k + t
  const __m512i ia = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), ib = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i ja = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), jb = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  const __m512i ka = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11), kb = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
  __m512i lo[4], hi[4], q[2][4];
  for (int m = 0; m < 4; ++m) {
    lo[m] = _mm512_permutex2var_epi64(y[2 * m], ia, y[2 * m + 1]);
    hi[m] = _mm512_permutex2var_epi64(y[2 * m], ib, y[2 * m + 1]);
  }
  for (int half = 0; half < 2; ++half) {
    q[half][0] = _mm512_permutex2var_epi64(lo[2 * half], ja, lo[2 * half + 1]);
    q[half][1] = _mm512_permutex2var_epi64(lo[2 * half], jb, lo[2 * half + 1]);
    q[half][2] = _mm512_permutex2var_epi64(hi[2 * half], ja, hi[2 * half + 1]);
    q[half][3] = _mm512_permutex2var_epi64(hi[2 * half], jb, hi[2 * half + 1]);
  }
  for (int c = 0; c < 4; ++c) {
    x[2 * c] = _mm512_permutex2var_epi64(q[0][c], ka, q[1][c]);
    x[2 * c + 1] = _mm512_permutex2var_epi64(q[0][c], kb, q[1][c]);
  }
}

// Scores of 64 tokens starting at t0 for every row (row g for kv-head g % H): out row g at out + g * stride.
// kWords = B / 8 is a template argument so that the byte loop unrolls and the transposed bytes stay in registers
// (1.6x faster than with B known only at run time).
template <int kWords>
IKV_TARGET void score_group(const Scanner& sc, int64_t t0, float* out, int64_t stride) {
  const Index& ix = sc.index;
  const int n_heads = ix.n_heads;
  const uint64_t* group = reinterpret_cast<const uint64_t*>(ix.sigs) + t0 * sc.words;
  __m512i weight_regs[2 * kMaxWords];
  const uint16_t* wbase = ix.weights + t0 * n_heads;
  for (int r = 0; r < 2 * n_heads; ++r) weight_regs[r] = _mm512_loadu_si512(wbase + 32 * r);
  for (int h = 0; h < n_heads; ++h) {
    __m512i x[8 * kWords];
    for (int w = 0; w < kWords; ++w) transpose_word(sc, group, h * kWords + w, x + 8 * w);
    __m512 weight[4];
    for (int o = 0; o < 2; ++o) {
      const __m512i halves = gather_halves(sc.weight_recipes[h][o], weight_regs, 2 * n_heads);
      weight[2 * o] = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
      weight[2 * o + 1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1));
    }
    for (int g = h; g < sc.planes->n_rows; g += n_heads) {
      // 16-bit sums per plane, even tokens (a byte's low half of each 16-bit lane) apart from odd ones: masking and
      // shifting keep the shuffle port free for the lookups, where widening each half would queue behind them
      __m512i even[3], odd[3];
      for (int p = 0; p < 3; ++p) even[p] = odd[p] = _mm512_setzero_si512();
      const __m512i low_byte = _mm512_set1_epi16(0x00FF);
      for (int j = 0; j < 8 * kWords; ++j) {
        const __mmask64 high = _mm512_movepi8_mask(x[j]);  // entries 128-255 come from the table's second half
        for (int p = 0; p < 3; ++p) {
          const __m512i* table = reinterpret_cast<const __m512i*>(sc.planes->at(g, j, p));
          const __m512i low_half = _mm512_permutex2var_epi8(_mm512_load_si512(table), x[j], _mm512_load_si512(table + 1));
          const __m512i high_half =
              _mm512_permutex2var_epi8(_mm512_load_si512(table + 2), x[j], _mm512_load_si512(table + 3));
          const __m512i v = _mm512_mask_blend_epi8(high, low_half, high_half);
          even[p] = _mm512_add_epi16(even[p], _mm512_and_si512(v, low_byte));
          odd[p] = _mm512_add_epi16(odd[p], _mm512_srli_epi16(v, 8));
        }
      }
      // int32 sums: the planes recombined, unbiased; then even and odd tokens interleaved back into token order
      __m512i sums[2][2];  // [parity][tokens 0-31 or 32-63 of that parity's 32]
      for (int part = 0; part < 2; ++part) {
        for (int parity = 0; parity < 2; ++parity) {
          __m512i total = _mm512_set1_epi32(-8 * kWords * kBias);
          for (int p = 0; p < 3; ++p) {
            const __m512i acc = parity ? odd[p] : even[p];
            const __m256i quarter = part ? _mm512_extracti64x4_epi64(acc, 1) : _mm512_castsi512_si256(acc);
            total = _mm512_add_epi32(total, _mm512_slli_epi32(_mm512_cvtepu16_epi32(quarter), 8 * p));
          }
          sums[parity][part] = total;
        }
      }
      const __m512i first_16 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i next_16 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      float* row = out + static_cast<int64_t>(g) * stride;
      for (int quarter = 0; quarter < 4; ++quarter) {  // tokens 16 q .. 16 q + 15
        const __m512i even_sums = sums[0][quarter / 2], odd_sums = sums[1][quarter / 2];
        const __m512i isum = _mm512_permutex2var_epi32(even_sums, quarter % 2 ? next_16 : first_16, odd_sums);
        const __m512 s = _mm512_mul_ps(weight[quarter], _mm512_cvtepi32_ps(isum));
        _mm512_storeu_ps(row + 16 * quarter, _mm512_add_ps(s, _mm512_setzero_ps()));
      }
    }
  }
}

IKV_TARGET void score_token(const Index& ix, const int32_t* luts, int n_rows, int64_t t, float* out, int64_t stride) {
  for (int g = 0; g < n_rows; ++g) {
    const int h = g % ix.n_heads;
    const uint8_t* sig = ix.sigs + (t * ix.n_heads + h) * ix.n_bytes;
    const int32_t* lut = luts + static_cast<int64_t>(g) * ix.n_bytes * 256;
    int32_t acc = 0;
    for (int j = 0; j < ix.n_bytes; ++j) acc += lut[256 * j + sig[j]];
    const float s = _cvtsh_ss(ix.weights[t * ix.n_heads + h]) * static_cast<float>(acc);
    out[static_cast<int64_t>(g) * stride] = s + 0.0f;
  }
}

// Scores of tokens [lo, hi) for every row: out row g at out + g * stride, token t at column t - lo.
IKV_TARGET void score_range(const Scanner& sc, const int32_t* luts, int64_t lo, int64_t hi, float* out,
                            int64_t stride) {
  int64_t t = lo;
  for (; t + kGroup <= hi; t += kGroup) switch (sc.words_per_head) {
      case 1: score_group<1>(sc, t, out + (t - lo), stride); break;
      case 2: score_group<2>(sc, t, out + (t - lo), stride); break;
      case 3: score_group<3>(sc, t, out + (t - lo), stride); break;
      default: score_group<4>(sc, t, out + (t - lo), stride); break;
    }
  for (; t < hi; ++t) score_token(sc.index, luts, sc.planes->n_rows, t, out + (t - lo), stride);
}

// Offer scores [n] of tokens first.. to `best`: a vector compare against its floor skips almost every token.
IKV_TARGET void keep_best(const float* scores, int64_t n, int64_t first, Best& best) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __mmask16 above = _mm512_cmp_ps_mask(_mm512_loadu_ps(scores + j), _mm512_set1_ps(best.floor), _CMP_GT_OQ);
    while (above) {
      const int lane = __builtin_ctz(above);
      above &= above - 1;
      if (scores[j + lane] > best.floor) best.offer(scores[j + lane], first + j + lane);  // the floor may have risen
    }
  }
  for (; j < n; ++j)
    if (scores[j] > best.floor) best.offer(scores[j], first + j);
}

bool make_scanner(const Index& ix, const Planes& planes, Scanner& sc) {
  if (ix.n_bytes % 8 != 0 || ix.n_bytes / 8 > kMaxWordsPerHead || ix.n_heads * ix.n_bytes / 8 > kMaxWords)
    return false;
  sc.index = ix;
  sc.planes = &planes;
  sc.words_per_head = ix.n_bytes / 8;
  sc.words = ix.n_heads * sc.words_per_head;
  for (int c = 0; c < sc.words; ++c) sc.word_recipes[c] = make_recipe(8, 8, sc.words, c);
  for (int h = 0; h < ix.n_heads; ++h)
    for (int o = 0; o < 2; ++o)
      sc.weight_recipes[h][o] = make_recipe(32, 32, ix.n_heads, 32 * o * ix.n_heads + h);
  return true;
}

template <typename Task>
void run_threads(int n_threads, int64_t n_tasks, const Task& task) {
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_tasks)));
  std::vector<std::thread> pool;
  for (int t = 1; t < n_threads; ++t)
    pool.emplace_back([&, t] {
      for (int64_t i = t; i < n_tasks; i += n_threads) task(i);
    });
  for (int64_t i = 0; i < n_tasks; i += n_threads) task(i);
  for (auto& thread : pool) thread.join();
}

#endif  // IKV_SIMD

}  // namespace

// 1 where this CPU runs the kernel (AVX-512 F, BW, VBMI and F16C, with the OS saving the registers), else 0.
extern "C" int ikv_cpu_scan_supported() {
#if IKV_SIMD
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("f16c");
#else
  return 0;
#endif
}

// Every score of tokens [start, N) into out [G, N - start]. Returns 0, or 1 where this file cannot run the shapes
// or the LUTs (the caller then uses the numba kernel).
extern "C" int ikv_cpu_weighted_scores(const uint8_t* sigs, const uint16_t* weights, int64_t n_tokens, int n_heads,
                                       int n_bytes, const int32_t* luts, int n_rows, int64_t start, int n_threads,
                                       float* out) {
#if IKV_SIMD
  if (!ikv_cpu_scan_supported()) return 1;
  const Index ix{sigs, weights, n_tokens, n_heads, n_bytes};
  Planes planes;
  Scanner sc;
  if (!build_planes(luts, n_rows, n_bytes, planes) || !make_scanner(ix, planes, sc)) return 1;
  const int64_t n = n_tokens - start, n_blocks = (n + kBlock - 1) / kBlock;
  run_threads(n_threads, n_blocks, [&](int64_t b) {
    const int64_t lo = start + b * kBlock, hi = std::min(n_tokens, lo + kBlock);
    score_range(sc, luts, lo, hi, out + (lo - start), n);
  });
  return 0;
#else
  return 1;
#endif
}

// The best k tokens of each row in each chunk of `chunk` tokens from `start`, as search._chunk_topk finds them:
// out_s, out_i [C, G, k], each (chunk, row) the best k it saw (ties to the lower token) in no particular order,
// unfilled slots left as the caller set them. Returns 0, or 1 as ikv_cpu_weighted_scores.
extern "C" int ikv_cpu_weighted_chunk_topk(const uint8_t* sigs, const uint16_t* weights, int64_t n_tokens,
                                           int n_heads, int n_bytes, const int32_t* luts, int n_rows, int64_t start,
                                           int64_t chunk, int64_t k, int n_threads, float* out_s, int64_t* out_i) {
#if IKV_SIMD
  if (!ikv_cpu_scan_supported() || chunk <= 0 || k <= 0) return 1;
  const Index ix{sigs, weights, n_tokens, n_heads, n_bytes};
  Planes planes;
  Scanner sc;
  if (!build_planes(luts, n_rows, n_bytes, planes) || !make_scanner(ix, planes, sc)) return 1;
  const int64_t n_chunks = (n_tokens - start + chunk - 1) / chunk;
  run_threads(n_threads, n_chunks, [&](int64_t c) {
    std::vector<float> buffer(static_cast<size_t>(n_rows) * kBlock);
    std::vector<Best> best(n_rows, Best(k));
    const int64_t end = std::min(n_tokens, start + (c + 1) * chunk);
    for (int64_t lo = start + c * chunk; lo < end; lo += kBlock) {
      const int64_t hi = std::min(end, lo + kBlock);
      score_range(sc, luts, lo, hi, buffer.data(), kBlock);
      for (int g = 0; g < n_rows; ++g) keep_best(buffer.data() + static_cast<int64_t>(g) * kBlock, hi - lo, lo, best[g]);
    }
    for (int g = 0; g < n_rows; ++g) {
      best[g].cut();
      const int64_t at = (c * n_rows + g) * k;
      for (size_t j = 0; j < best[g].kept.size(); ++j) {
        out_s[at + j] = best[g].kept[j].score;
        out_i[at + j] = best[g].kept[j].token;
      }
    }
  });
  return 0;
#else
  return 1;
#endif
}
