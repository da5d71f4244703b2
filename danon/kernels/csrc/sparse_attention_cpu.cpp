// danon's CPU kernel for sparse attention plans, forward and backward (danon/kernels/native_cpu.py builds and
// loads it, danon/kernels/fused_cpu.py lays a plan's call out for it; docs/executors.md explains it).
//
// Written by hand because no library runs it: aten's CPU flash kernel takes one key set per batch entry, so
// the gathered executor (danon/kernels/gather.py) calls it once per part (window, own block, listed keys,
// summaries) and merges the parts by log-sum-exp; FlexAttention cannot express summaries. Here one query
// block and one head see all their keys in one tile: the window, a range of the summary table and runs of
// consecutive listed blocks are read in place, the other listed tokens and summaries are gathered next to them
// (key_set), and one softmax covers them all.
//
// Forward work item: (batch, kv head, query block), handed to the threads in runs of consecutive query blocks (see
// StealableRanges); its G query heads reuse the gathered keys. Per head:
//   logits [b, L] = q_block . [window | range | runs | gathered keys]^T   (brgemm on K^T, kept transposed)
//   scale, key biases (padding, log n_s), ALiBi -slope |i - pos|, the causal triangle of the own block
//   p = exp(logits - max), lse = max + log(sum p)                   (at::vec; exp by softmax_exp)
//   out [b, Dv] = p . [the same keys' values] / sum p                (brgemm)
// A row that sees no key returns out 0 and lse -inf.
// Backward work item: (batch, kv head), its query blocks in order, so that a thread owns its keys' gradients:
//   p recomputed from the lse, dS = p (dp - delta), dq = scale dS K, dK += scale dS^T Q, dV += p^T dO
//   (q K^T, dO V^T and dS K by brgemm; the two products with a transposed left operand by MKL's sgemm).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <list>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "danon_library.h"

// -DDANON_PROFILE (native_cpu.load(profile=True), bench/profile_cpu.py --kernel-phases): time spent per phase,
// summed over the threads, read by danon_cpu_profile::phase_seconds. The default build has no timer.
#ifdef DANON_PROFILE
#include <chrono>
namespace {
std::atomic<int64_t> phase_ns[4];  // gather, gemm, softmax (and dS), scatter of the listed keys' gradients
struct PhaseTimer {
  int phase;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  explicit PhaseTimer(int ph) : phase(ph) {}
  ~PhaseTimer() {
    phase_ns[phase] += std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now() - start).count();
  }
};
}  // namespace
#define DANON_PHASE(ph) PhaseTimer danon_phase_timer_(ph)
#else
#define DANON_PHASE(ph)
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for the softmax, x <= 0 (-inf: 0; NaN stays NaN). With AVX-512 by hand: e^x = 2^n e^r with n = round(x
// log2 e), r = x - n ln 2 (ln 2 in two parts, Cody and Waite), e^r by Cephes' expf polynomial and 2^n by vscalefps,
// which also gives 0 far below the range: 13 vector operations where at::vec's exp_u20 (aten's flash kernel's)
// takes 22 (the scale instruction replaces all but one of its clamps, its range mask and integer exponent build). Relative error
// under 1e-7 down to e^-80 (exp_u20: 4e-7). Other ISAs: exp_u20.
inline Vec softmax_exp(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  // clamped below so that -inf (masked keys) gives 2^-200 e^r = 0: unclamped, r = -inf - (-inf) is NaN and the
  // result rests on what vscalefps makes of NaN times 2^-inf (0 on this Xeon). vmaxps returns its second operand
  // when either is NaN: a NaN logit stays NaN.
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-138.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
#else
  return x.exp_u20();
#endif
}

// dst[N x M] (ld_dst) = src[M x N] (ld_src) transposed. at::vec's transpose_mxn with run-time sizes is vectorized
// for AVX-512 only (16 x 16 tiles); elsewhere it is a scalar double loop, which took 4 % of MSRA's forward on an
// AVX2 machine: there, 8 x 8 tiles through its AVX2 transpose_mxn<float, 8, 8>, the edges by the scalar loop.
void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t M, int64_t N) {
#if defined(CPU_CAPABILITY_AVX2)
  const int64_t M8 = M / 8 * 8, N8 = N / 8 * 8;
  for (int64_t i = 0; i < M8; i += 8)
    for (int64_t j = 0; j < N8; j += 8)
      at::vec::transpose_mxn<float, 8, 8>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
  if (N8 < N)  // the last columns, every row
    at::vec::transpose_mxn<float>(src + N8, ld_src, dst + N8 * ld_dst, ld_dst, static_cast<int>(M),
                                  static_cast<int>(N - N8));
  if (M8 < M)  // the last rows, the columns of whole tiles
    at::vec::transpose_mxn<float>(src + M8 * ld_src, ld_src, dst + M8, ld_dst, static_cast<int>(M - M8),
                                  static_cast<int>(N8));
#else
  at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, static_cast<int>(M), static_cast<int>(N));
#endif
}

// Row-major C[rows x cols] (ld ldc) = alpha op(A) . op(B) + beta C with column-major BLAS: C^T = op(B)^T op(A)^T,
// so the operands swap. A is [rows x inner] row-major ([inner x rows] when trans_a), B [inner x cols] ([cols x
// inner] when trans_b).
void gemm(bool trans_a, bool trans_b, int rows, int cols, int inner, float alpha, const float* a, int lda,
          const float* b, int ldb, float beta, float* c, int ldc) {
  DANON_PHASE(1);
  if (rows == 0 || cols == 0) return;
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  sgemm_(&tb, &ta, &cols, &rows, &inner, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Row-major C[rows x cols] (+)= A[rows x inner] . B[inner x cols], neither transposed, through aten's
// cpublas::brgemm: oneDNN's JIT micro-kernel (AVX-512 or AVX2) where aten has it, sgemm otherwise. On the project's
// first machine (AMD Zen 4) MKL's sgemm ran its AVX2 path, about 20 % slower on these tile shapes; on an Intel
// Xeon the two are even (docs/executors.md). A new
// (rows, cols, inner, ld, accumulate) combination costs one JIT compile (about 0.1 ms), cached per thread.
//
// A long inner dimension (p . V over all of a row's keys, dS . K: more than 2 kInnerChunk) runs as products of
// kInnerChunk keys added into C: B's chunk (64 x 64 fp32, 16 KiB) stays in L1 while brgemm streams it, where one
// call over 384-1600 keys read B from L2. Products over D <= 128 (q K^T, dO V^T) stay whole. One core, 64-row tiles, 64 wide, on an AMD EPYC (Zen 3, AVX2): 53-71 GFLOP/s in chunks
// against 39-62 in one call (docs/executors.md).
constexpr int64_t kInnerChunk = 64;

void gemm_nn(int64_t rows, int64_t cols, int64_t inner, const float* a, int64_t lda, const float* b, int64_t ldb,
             bool accumulate, float* c, int64_t ldc) {
  if (rows == 0 || cols == 0) return;
  if (inner == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < rows; ++r) std::fill_n(c + r * ldc, cols, 0.f);
    return;
  }
  DANON_PHASE(1);
  const int64_t chunk = inner > 2 * kInnerChunk ? kInnerChunk : inner;
  for (int64_t k0 = 0; k0 < inner; k0 += chunk)
    at::native::cpublas::brgemm(rows, cols, std::min(chunk, inner - k0), lda, ldb, ldc, accumulate || k0 > 0,
                                a + k0, b + k0 * ldb, c, /*is_vnni=*/false);
}

// Flush-to-zero (MXCSR.FTZ) on the calling thread for the life of the guard, then the thread's own setting back.
// ALiBi makes distant keys' p tiny (e^-87 and below at slope 0.5, 175 keys away), and their products with values,
// p . V and dS^T Q accumulated from 0, fall below 1.2e-38: each such denormal result costs Intel CPUs a
// microcode assist (DALA's backward at 16k: 225 against 260 ms with the flush; AMD's Zen 4 pays nothing).
// Only results under 1.2e-38 in magnitude change (to 0), against outputs of order |v| (p's row sum is >= 1);
// denormal inputs are still read as they are (no DAZ). Other architectures keep their default. By hand because
// torch.set_flush_denormal is process-wide and never restored; this is scoped to the kernel's own loops.
struct FlushDenormalResults {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int saved = _MM_GET_FLUSH_ZERO_MODE();
  FlushDenormalResults() { _MM_SET_FLUSH_ZERO_MODE(_MM_FLUSH_ZERO_ON); }
  ~FlushDenormalResults() { _MM_SET_FLUSH_ZERO_MODE(saved); }
#endif
};

// Maps a fresh buffer's pages before the kernel writes it: one madvise(MADV_POPULATE_WRITE) per thread over its
// share, instead of a page fault per 4 KiB on first touch. Buffers of 32 MiB and more come from a fresh mmap
// under glibc's malloc (docs/executors.md), and on this project's VMs a fault costs about 1 ms per MiB;
// populating costs about 0.7. Contents are unchanged; pages already mapped are left as they are; kernels older
// than Linux 5.14 refuse the advice (EINVAL) and the pages fault in as before. The pages are split over the
// threads statically, not by who writes them later: on a multi-socket host some may land on the other node. By
// hand: torch's CPU allocator has no such option.
void populate(void* data, int64_t bytes) {
#if defined(__linux__)
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, which older libc headers lack
  const int64_t page = sysconf(_SC_PAGESIZE);
  if (page <= 0 || bytes < (int64_t{1} << 21)) return;  // under 2 MiB: not worth the calls
  const auto start = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (start + page - 1) / page * page, hi = (start + bytes) / page * page;
  const int64_t pages = static_cast<int64_t>((hi - lo) / page);
  at::parallel_for(0, pages, 256, [&](int64_t begin, int64_t end) {
    // the result is not needed: where the advice is refused, the kernel's writes fault the pages in
    (void)madvise(reinterpret_cast<void*>(lo + begin * page), (end - begin) * page, kPopulateWrite);
  });
#endif
}

// The memory of the kernel's large outputs (out; dq, dk, dv), recycled: a freed buffer of 1 MiB or more is kept,
// pages mapped, and handed to the next output of the same byte size; what is kept stays under a limit (default
// 256 MiB; DANON_CPU_KEEP_MIB in the environment, read once; 0 keeps nothing), the oldest buffers given back to
// the system first. Under glibc's malloc every buffer of 32 MiB or more is a fresh mmap whose pages each call
// maps again (populate), about a tenth of MSRA's forward at N = 16k on this project's VMs (docs/executors.md). A
// training loop frees each step's outputs before the next step makes the same ones, so they come back here. By
// hand: torch's CPU allocator keeps nothing (its caching allocator is CUDA's), and a process-wide malloc setting
// (GLIBC_TUNABLES) is the user's to choose, not a library's.
class RecyclingAllocator final : public c10::Allocator {
 public:
  static RecyclingAllocator& get() {
    static auto* allocator = new RecyclingAllocator();  // never destroyed: tensors may outlive static destructors
    return *allocator;
  }

  c10::DataPtr allocate(size_t bytes) override {
    void* base = take(bytes);
    const bool recycled = base != nullptr;
    if (!recycled) {
      if (posix_memalign(&base, kHeader, kHeader + std::max<size_t>(bytes, 1)) != 0) base = nullptr;
      TORCH_CHECK(base != nullptr, "danon_cpu: out of memory allocating ", bytes, " bytes");
      *static_cast<size_t*>(base) = bytes;
    }
    void* data = static_cast<char*>(base) + kHeader;
    if (!recycled) populate(data, static_cast<int64_t>(bytes));
    return {data, base, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Bytes kept now; release_all gives them back to the system.
  int64_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(kept_);
  }
  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, base] : free_) std::free(base);
    free_.clear();
    kept_ = 0;
  }

 private:
  static constexpr size_t kHeader = 64;          // the buffer's byte size, and the data's 64-byte alignment
  static constexpr size_t kMinKept = size_t{1} << 20;  // smaller ones malloc recycles itself

  RecyclingAllocator() {
    const char* env = std::getenv("DANON_CPU_KEEP_MIB");
    limit_ = (env != nullptr ? static_cast<size_t>(std::max(0L, std::strtol(env, nullptr, 10))) : 256) << 20;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it)  // the most recently freed first: likely in cache
      if (it->first == bytes) {
        void* base = it->second;
        free_.erase(std::next(it).base());
        kept_ -= bytes;
        return base;
      }
    return nullptr;
  }

  static void give_back(void* base) {
    RecyclingAllocator& self = get();
    const size_t bytes = *static_cast<size_t*>(base);
    std::lock_guard<std::mutex> lock(self.mutex_);
    if (bytes < kMinKept || bytes > self.limit_) {
      std::free(base);
      return;
    }
    while (self.kept_ + bytes > self.limit_) {  // the oldest go first
      self.kept_ -= self.free_.front().first;
      std::free(self.free_.front().second);
      self.free_.pop_front();
    }
    self.free_.emplace_back(bytes, base);
    self.kept_ += bytes;
  }

  std::mutex mutex_;
  std::list<std::pair<size_t, void*>> free_;  // (byte size, base), oldest first
  size_t kept_ = 0, limit_ = 0;
};

// A contiguous fp32 (or other dtype) CPU tensor whose memory comes from RecyclingAllocator.
at::Tensor recycled_empty(at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat) {
  return at::detail::empty_generic(sizes, &RecyclingAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

struct Plan {
  int64_t B, H, Hkv, G, b, D, Dv, n, tq, tk, first;
  int64_t window;  // -1: none
  bool causal;
  float scale;
  // A row of logits is softmaxed in units of `unit` (x * unit is the scaled logit): the scale itself when it is
  // positive with a finite inverse (raw products stay as they are; biases and ALiBi are added divided by it),
  // otherwise 1 with every key scaled in place (a scale <= 0 is a caller's choice). Set once by make_plan.
  bool raw_units;
  float unit;
  const float *q, *k, *v, *key_bias, *slopes;
  int64_t sqB, sqH, sqN;
  const int32_t *block_idx, *token_idx, *summary_idx;  // int32: the plans' own dtype (no int64 copy)
  int64_t kb, kt, ks, S;
  const float *sk, *sv, *summary_bias, *summary_pos;
  float *out, *lse;
};

// Rows of the in-place window (absolute key blocks lo .. hi inclusive); lo > hi: none.
void window_blocks(const Plan& p, int64_t bh_kv, int64_t blk, int64_t& lo, int64_t& hi) {
  if (p.window >= 0) {
    const int64_t w = std::min(p.window, p.tk);
    lo = std::max<int64_t>(0, blk - w);
    hi = p.causal ? blk : std::min(p.tk - 1, blk + w);
    return;
  }
  lo = 1;
  hi = 0;
  if (p.causal && p.block_idx != nullptr) {  // a plan without a window: the own block only if it is listed
    const int32_t* row = p.block_idx + (bh_kv * p.tq + (blk - p.first)) * p.kb;
    for (int64_t j = 0; j < p.kb; ++j)
      if (row[j] == blk) lo = hi = blk;
  }
}

int64_t max_listed(const Plan& p) { return p.kb * p.b + p.kt + p.ks; }

int64_t max_keys(const Plan& p) {
  const int64_t max_window = p.window >= 0 ? (p.causal ? 1 : 2) * std::min(p.window, p.tk) + 1 : 1;
  return max_window * p.b + max_listed(p);
}

// A count of keys rounded up to the vector width (softmax_row's passes over a padded row have no scalar tail).
int64_t padded(int64_t count) { return (count + Vec::size() - 1) / Vec::size() * Vec::size(); }

// A row of logits' stride: room for any key set, padded.
int64_t row_stride(const Plan& p) { return padded(max_keys(p)); }

// Consecutive listed key blocks (tokens key0 .. key0 + count), read in place like the window; `offset` is the run's
// first key among the listed blocks' (its columns of a row of logits start at lw + ls + offset, its rows of the
// backward's scratch dkg, dvg at lg + offset).
struct Run {
  int64_t key0, count, offset;
};

struct Scratch {
  std::vector<Run> runs;  // the query block's listed blocks, merged into runs (see key_set)
  std::vector<float> kg, vg, bias, pos, logits;
  bool any_bias = false;  // whether a gathered key has a bias (padding, log n_s): none skips the bias pass
  std::vector<int64_t> src;  // where each gathered key came from: a key row (>= 0) or summary row -1 - src
  std::vector<float> dp, dkg, dvg;  // the backward's: dp (then dS); the gathered keys' then the runs' gradients
  std::vector<uint8_t> zeroed;       // the backward's: which key blocks' dk and dv rows are initialised
  // Keys (and in the backward values) transposed (see transpose_key_blocks): kt [tk, D, b] (vt [tk, Dv, b]) the
  // kv head kt_head's blocks whose kt_ready is set, kgt [D, ldg] (vgt [Dv, ldg]) the gathered ones. The backward
  // also keeps the gathered keys row-major in kg (dq = dS K); the forward its gathered values in vg (out = p V).
  bool backward = false;
  std::unique_ptr<float[]> kt, vt;  // uninitialised: only the blocks a thread uses are written (and read)
  std::vector<float> kgt, vgt;
  std::vector<uint8_t> kt_ready;
  int64_t kt_head = -1, ldg = 0;
  // A query block's summaries read in place (see summary_range): the kv head st_head's summary keys transposed,
  // skt [D, lds] (backward: values too, svt [Dv, lds]), and the range's biases: log n_s where listed, -inf between.
  std::unique_ptr<float[]> skt, svt;
  std::vector<float> range_bias;
  int64_t st_head = -1, lds = 0;
};

// q K^T (and the backward's dO V^T) run through brgemm (gemm_nn), which takes K^T untransposed: a kv head's key
// (and value) blocks are transposed into s.kt (s.vt) when first used and kept for its next query blocks (a
// thread mostly runs consecutive query blocks of one head, which share most of their window; see
// StealableRanges), so each block is transposed about once per call per thread that runs the head. Each block's [D, b] tile is contiguous (kt is [tk, D, b]), not a column range
// of one [D, n] matrix: brgemm reads B row after row, and rows n floats apart (64 KiB at N = 16k) are 64 streams
// in as many pages, which ran q K^T at about 60 % of the rate on compact tiles (one core, UCSA's key sets).
void transpose_key_blocks(const Plan& p, Scratch& s, int64_t bh_kv, int64_t lo, int64_t hi) {
  if (s.kt_head != bh_kv) {
    std::fill(s.kt_ready.begin(), s.kt_ready.end(), uint8_t{0});
    s.kt_head = bh_kv;
  }
  const float* kbase = p.k + bh_kv * p.n * p.D;
  for (int64_t j = lo; j <= hi; ++j) {
    if (s.kt_ready[j]) continue;
    s.kt_ready[j] = 1;
    transpose(kbase + j * p.b * p.D, p.D, s.kt.get() + j * p.D * p.b, p.b, p.b, p.D);
    if (s.backward)
      transpose(p.v + (bh_kv * p.n + j * p.b) * p.Dv, p.Dv, s.vt.get() + j * p.Dv * p.b, p.b, p.b, p.Dv);
  }
}

// c[rows, count] = a[rows, dim] . the transposed key (or value) blocks of tokens key0 .. key0 + count (whole
// blocks) in `blocks` ([tk, dim, b], see transpose_key_blocks): one product per block.
void gemm_transposed_blocks(const Plan& p, int64_t rows, int64_t key0, int64_t count, int64_t dim, const float* a,
                            int64_t lda, const float* blocks, float* c, int64_t ldc) {
  for (int64_t j = key0 / p.b, c0 = 0; c0 < count; ++j, c0 += p.b)
    gemm_nn(rows, p.b, dim, a, lda, blocks + j * dim * p.b, p.b, false, c + c0, ldc);
}

// Most of a query block's listed summaries as one range [lo, lo + count) of its kv head's summary table, read in
// place: UCSA lists nearly every past block's summary (about a thousand per query block at N = 64k, whose gather
// cost more than their products), MSRA its top level's spans (256 at a million tokens) next to a few of each
// lower level. The range is the largest cluster of listed indices (in the row's order, ascending in the plans,
// consecutive ones at most kClusterGap apart), taken when it holds at least kMinRange, spans at most twice as
// many and fits the tile; its unlisted summaries get bias -inf (p = 0, no gradient), the listed ones outside it
// are gathered. Returns count 0 when every summary is gathered.
struct SummaryRange {
  int64_t lo = 0, count = 0;
};
constexpr int64_t kClusterGap = 32;
// Below this many, gathering them costs less than the range's products of their own (MSRA's 64 top-level
// summaries per query block at N = 64k: 2-3 % slower in place).
constexpr int64_t kMinRange = 128;

SummaryRange summary_range(const Plan& p, int64_t bh_kv, int64_t t, Scratch& s) {
  SummaryRange r;
  if (p.summary_idx == nullptr || (p.slopes != nullptr && p.summary_pos == nullptr)) return r;
  const int32_t* row = p.summary_idx + (bh_kv * p.tq + t) * p.ks;
  int64_t lo = 0, hi = -1, listed = 0;          // the largest cluster so far
  int64_t c_lo = 0, c_hi = -1, c_listed = 0;    // the current one
  int64_t total = 0;
  for (int64_t j = 0; j < p.ks; ++j) {
    const int64_t idx = row[j];
    if (idx < 0 || idx >= p.S) continue;
    ++total;
    if (c_listed > 0 && idx > c_hi && idx - c_hi <= kClusterGap) {
      c_hi = idx;
      ++c_listed;
    } else {
      c_lo = c_hi = idx;
      c_listed = 1;
    }
    if (c_listed > listed) {
      lo = c_lo;
      hi = c_hi;
      listed = c_listed;
    }
  }
  const int64_t span = hi - lo + 1;
  // few or scattered: gathered. The range's gaps and the gathered rest must fit the row's ks summary slots.
  if (listed < kMinRange || span > 2 * listed || span + total - listed > p.ks) return r;
  if (s.st_head != bh_kv) {
    s.st_head = bh_kv;
    transpose(p.sk + bh_kv * p.S * p.D, p.D, s.skt.get(), s.lds, p.S, p.D);
    if (s.backward)
      transpose(p.sv + bh_kv * p.S * p.Dv, p.Dv, s.svt.get(), s.lds, p.S, p.Dv);
  }
  std::fill_n(s.range_bias.data(), span, kNegInf);
  for (int64_t j = 0; j < p.ks; ++j) {
    const int64_t idx = row[j];
    if (idx < lo || idx > hi) continue;
    if (s.range_bias[idx - lo] != kNegInf) return r;  // listed twice (a hand-made plan): the gather counts it twice
    s.range_bias[idx - lo] = p.summary_bias[bh_kv * p.S + idx];
  }
  r.lo = lo;
  r.count = span;
  return r;
}

// Gathers the listed tokens and the summaries outside `range` of one (batch, kv head, query block): returns their
// count.
int64_t gather_listed(const Plan& p, int64_t bb, int64_t hk, int64_t t, const SummaryRange& range, Scratch& s) {
  DANON_PHASE(0);
  const int64_t bh_kv = bb * p.Hkv + hk, blk = t + p.first, start = blk * p.b;
  const float* kbase = p.k + bh_kv * p.n * p.D;
  const float* vbase = p.v + bh_kv * p.n * p.Dv;
  const float* kbias = p.key_bias != nullptr ? p.key_bias + bb * p.n : nullptr;
  int64_t m = 0;
  s.any_bias = false;
  // one key: its rows into kg (backward) or vg (forward), down column m of kgt (and vgt)
  auto add = [&](const float* krow, const float* vrow, float bias, float pos, int64_t src) {
    if (!s.src.empty()) s.src[m] = src;
    if (s.backward) std::copy(krow, krow + p.D, s.kg.data() + m * p.D);
    if (!s.backward) std::copy(vrow, vrow + p.Dv, s.vg.data() + m * p.Dv);
    for (int64_t d = 0; d < p.D; ++d) s.kgt[d * s.ldg + m] = krow[d];
    if (s.backward)
      for (int64_t d = 0; d < p.Dv; ++d) s.vgt[d * s.ldg + m] = vrow[d];
    s.bias[m] = bias;
    s.any_bias |= bias != 0.f;
    s.pos[m] = pos;
    ++m;
  };
  if (p.token_idx != nullptr) {
    const int32_t* row = p.token_idx + (bh_kv * p.tq + t) * p.kt;
    for (int64_t j = 0; j < p.kt; ++j) {
      const int64_t key = row[j];
      if (key < 0 || key >= p.n || (p.causal && key >= start)) continue;
      add(kbase + key * p.D, vbase + key * p.Dv, kbias != nullptr ? kbias[key] : 0.f, static_cast<float>(key), key);
    }
  }
  if (p.summary_idx != nullptr) {
    const int32_t* row = p.summary_idx + (bh_kv * p.tq + t) * p.ks;
    const float* sk = p.sk + bh_kv * p.S * p.D;
    const float* sv = p.sv + bh_kv * p.S * p.Dv;
    for (int64_t j = 0; j < p.ks; ++j) {
      const int64_t idx = row[j];
      if (idx < 0 || idx >= p.S || (idx >= range.lo && idx < range.lo + range.count)) continue;  // in place
      add(sk + idx * p.D, sv + idx * p.Dv, p.summary_bias[bh_kv * p.S + idx],
          p.summary_pos != nullptr ? p.summary_pos[bh_kv * p.S + idx] : 0.f, -1 - idx);
    }
  }
  return m;
}

// The keys of one (batch, kv head, query block), in the order of a row of logits: the window's rows in place
// (key0 .. key0 + lw), ls summaries in place (s0 .. s0 + ls, summary_range; ls = 0: none), the listed blocks in
// place from lw + ls on (s.runs, lr keys in all), and lg tokens and summaries gathered into the scratch from
// lx = lw + ls + lr on; L = lx + lg.
struct KeySet {
  int64_t bh_kv, blk, lw, key0, ls, s0, lr, lx, lg, L;
  const float *kw, *vw, *kbias;
};

// The listed blocks as runs of consecutive blocks (UCSA lists them ascending), their tiles of kt (vt) made
// ready: their products read k, v and kt in place, as the window's do (a gather of UCSA's 16 selected blocks
// per query block cost more than a tenth of its forward at N = 64k). Returns their key count.
int64_t listed_runs(const Plan& p, int64_t bh_kv, int64_t t, Scratch& s) {
  s.runs.clear();
  if (p.block_idx == nullptr) return 0;
  const int64_t blk = t + p.first;
  const int32_t* row = p.block_idx + (bh_kv * p.tq + t) * p.kb;
  int64_t keys = 0;
  for (int64_t j = 0; j < p.kb; ++j) {
    const int64_t blk_j = row[j];
    if (blk_j < 0 || blk_j >= p.tk || (p.causal && blk_j >= blk)) continue;  // causal: the own block is the window's
    transpose_key_blocks(p, s, bh_kv, blk_j, blk_j);
    if (!s.runs.empty() && s.runs.back().key0 + s.runs.back().count == blk_j * p.b)
      s.runs.back().count += p.b;
    else
      s.runs.push_back({blk_j * p.b, p.b, keys});
    keys += p.b;
  }
  return keys;
}

KeySet key_set(const Plan& p, int64_t bb, int64_t hk, int64_t t, Scratch& s) {
  KeySet ks{};
  ks.bh_kv = bb * p.Hkv + hk;
  ks.blk = t + p.first;
  int64_t lo, hi;
  window_blocks(p, ks.bh_kv, ks.blk, lo, hi);
  ks.lw = lo <= hi ? (hi - lo + 1) * p.b : 0;
  ks.key0 = std::max<int64_t>(lo, 0) * p.b;
  const SummaryRange range = summary_range(p, ks.bh_kv, t, s);
  ks.ls = range.count;
  ks.s0 = range.lo;
  ks.lr = listed_runs(p, ks.bh_kv, t, s);
  ks.lx = ks.lw + ks.ls + ks.lr;
  ks.lg = gather_listed(p, bb, hk, t, range, s);
  ks.L = ks.lx + ks.lg;
  ks.kw = p.k + (ks.bh_kv * p.n + ks.key0) * p.D;
  ks.vw = p.v + (ks.bh_kv * p.n + ks.key0) * p.Dv;
  ks.kbias = p.key_bias != nullptr ? p.key_bias + bb * p.n : nullptr;
  return ks;
}

// x <- x + (bias - slope |i - pos|) / unit over [0, count) (scaled by the scale first when unit is 1); keys at
// positions pos0 + c (pos == nullptr) or pos[c]. Nothing to do for raw keys without bias or ALiBi.
void add_key_terms(float* x, int64_t count, const Plan& p, const float* bias, bool alibi, float slope, float fi,
                   int64_t pos0, const float* pos) {
  const bool scaled_here = !p.raw_units;
  if (count <= 0 || (bias == nullptr && !alibi && !scaled_here)) return;
  const float inv = scaled_here ? 1.f : 1.f / p.scale, mul = scaled_here ? p.scale : 1.f;
  const Vec vinv(inv), vmul(mul), vslope(slope * inv), vi(fi), iota = Vec::arange(0.f, 1.f);
  int64_t c = 0;
  for (; c + Vec::size() <= count; c += Vec::size()) {
    Vec y = Vec::loadu(x + c) * vmul;
    if (bias != nullptr) y = at::vec::fmadd(Vec::loadu(bias + c), vinv, y);
    if (alibi) {
      const Vec ps = pos != nullptr ? Vec::loadu(pos + c) : iota + Vec(static_cast<float>(pos0 + c));
      y = y - vslope * (vi - ps).abs();
    }
    y.store(x + c);
  }
  for (; c < count; ++c) {
    float y = x[c] * mul + (bias != nullptr ? bias[c] * inv : 0.f);
    if (alibi) y -= slope * inv * std::abs(fi - (pos != nullptr ? pos[c] : static_cast<float>(pos0 + c)));
    x[c] = y;
  }
}

// How many of the window's lw keys (from key0 on) query row i sees: under causal masking those up to its own
// position; the forward masks the rest, the backward zeroes their dp.
int64_t visible_window_keys(const Plan& p, int64_t lw, int64_t key0, int64_t i) {
  return p.causal ? std::max<int64_t>(0, std::min<int64_t>(lw, i - key0 + 1)) : lw;
}

// One row of logits [window | range | runs | gathered keys] -> unnormalised probabilities in place, in one pass
// for the max and one for the exp over the whole row padded to a multiple of the vector width (the keys a row
// must not see, the own block's triangle and the padding, are set to -inf first: their exp is 0). Per-segment
// passes with scalar tails (std::exp) took about 15 % longer at MSRA's ~330 keys per row (31 against 27
// thread-ms at N = 16k). forward: returns the row's max (in scaled logits) and sum; backward: p = exp(logit -
// lse) with the forward's lse.
void softmax_row(const Plan& p, float* row, const KeySet& ks, int64_t i, float slope, Scratch& s, bool forward,
                 float lse, float& row_max, float& row_sum) {
  DANON_PHASE(2);
  const float fi = static_cast<float>(i);
  const bool alibi = p.slopes != nullptr;
  const int64_t lw = ks.lw, key0 = ks.key0, L = ks.L, Lp = padded(L);
  const int64_t visible = visible_window_keys(p, lw, key0, i);
  add_key_terms(row, visible, p, ks.kbias != nullptr ? ks.kbias + key0 : nullptr, alibi, slope, fi, key0, nullptr);
  std::fill(row + visible, row + lw, kNegInf);
  add_key_terms(row + lw, ks.ls, p, s.range_bias.data(), alibi, slope, fi, 0,
                p.summary_pos != nullptr ? p.summary_pos + ks.bh_kv * p.S + ks.s0 : nullptr);
  for (const Run& run : s.runs)  // the listed blocks: keys at positions key0 .. key0 + count, as the window's
    add_key_terms(row + lw + ks.ls + run.offset, run.count, p, ks.kbias != nullptr ? ks.kbias + run.key0 : nullptr,
                  alibi, slope, fi, run.key0, nullptr);
  add_key_terms(row + ks.lx, ks.lg, p, s.any_bias ? s.bias.data() : nullptr, alibi, slope, fi, 0, s.pos.data());
  std::fill(row + L, row + Lp, kNegInf);
  const float unit = p.unit;
  constexpr int64_t W = Vec::size();
  float shift = lse;
  if (forward) {
    // four independent maxima, as the sums below are two: one chain waits for the instruction's latency on every
    // vector (UCSA's rows of ~1700 keys at 16k: forward 3-4 % faster with both)
    Vec m0(kNegInf), m1(kNegInf), m2(kNegInf), m3(kNegInf);
    int64_t c = 0;
    for (; c + 4 * W <= Lp; c += 4 * W) {
      m0 = at::vec::maximum(m0, Vec::loadu(row + c));
      m1 = at::vec::maximum(m1, Vec::loadu(row + c + W));
      m2 = at::vec::maximum(m2, Vec::loadu(row + c + 2 * W));
      m3 = at::vec::maximum(m3, Vec::loadu(row + c + 3 * W));
    }
    for (; c < Lp; c += W) m0 = at::vec::maximum(m0, Vec::loadu(row + c));
    Vec vmax = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
    const float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
    row_max = mx == kNegInf ? kNegInf : mx * unit;
    shift = row_max;
  }
  if (shift == kNegInf) {  // no key visible: p = 0 everywhere
    std::fill(row, row + Lp, 0.f);
    row_max = kNegInf;
    row_sum = 0.f;
    return;
  }
  const Vec vunit(unit), vshift(shift);
  Vec s0(0.f), s1(0.f);
  int64_t c = 0;
  for (; c + 2 * W <= Lp; c += 2 * W) {
    const Vec e0 = softmax_exp(at::vec::fmsub(Vec::loadu(row + c), vunit, vshift));
    const Vec e1 = softmax_exp(at::vec::fmsub(Vec::loadu(row + c + W), vunit, vshift));
    e0.store(row + c);
    e1.store(row + c + W);
    s0 = s0 + e0;
    s1 = s1 + e1;
  }
  for (; c < Lp; c += W) {
    const Vec e = softmax_exp(at::vec::fmsub(Vec::loadu(row + c), vunit, vshift));
    e.store(row + c);
    s0 = s0 + e;
  }
  Vec vsum = s0 + s1;
  row_sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
}

void run_item(const Plan& p, int64_t item, Scratch& s) {
  const int64_t t = item % p.tq, hk = (item / p.tq) % p.Hkv, bb = item / (p.tq * p.Hkv);
  const KeySet ks = key_set(p, bb, hk, t, s);
  const int64_t blk = ks.blk, lw = ks.lw, ls = ks.ls, lx = ks.lx, lg = ks.lg, L = ks.L, key0 = ks.key0;
  const float* vw = ks.vw;
  const float* sv = ls > 0 ? p.sv + (ks.bh_kv * p.S + ks.s0) * p.Dv : nullptr;
  if (lw > 0) transpose_key_blocks(p, s, ks.bh_kv, key0 / p.b, (key0 + lw) / p.b - 1);
  float* logits = s.logits.data();
  const int64_t ld = row_stride(p);  // one row stride for every tile: brgemm compiles a kernel per shape and ld
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t h = hk * p.G + g;
    const float* q = p.q + bb * p.sqB + h * p.sqH + t * p.b * p.sqN;
    float* out = p.out + ((bb * p.H + h) * p.tq * p.b + t * p.b) * p.Dv;
    float* lse = p.lse + (bb * p.H + h) * p.tq * p.b + t * p.b;
    if (L == 0) {
      std::fill(out, out + p.b * p.Dv, 0.f);
      std::fill(lse, lse + p.b, kNegInf);
      continue;
    }
    // The whole window in one product, the own block's upper triangle included (masked in softmax_row): four
    // 16-row bands that skipped most of the triangle ran 1-3 % slower (more, smaller calls; docs/executors.md).
    // As in aten's flash kernel, p . V then multiplies p = 0 by later rows' values: finite values add nothing.
    gemm_transposed_blocks(p, p.b, key0, lw, p.D, q, p.sqN, s.kt.get(), logits, ld);
    gemm_nn(p.b, ls, p.D, q, p.sqN, s.skt.get() + ks.s0, s.lds, false, logits + lw, ld);
    for (const Run& run : s.runs)
      gemm_transposed_blocks(p, p.b, run.key0, run.count, p.D, q, p.sqN, s.kt.get(), logits + lw + ls + run.offset, ld);
    gemm_nn(p.b, lg, p.D, q, p.sqN, s.kgt.data(), s.ldg, false, logits + lx, ld);
    const float slope = p.slopes != nullptr ? p.slopes[h] : 0.f;
    float inv[1024];  // b <= 1024 (checked by the caller)
    for (int64_t r = 0; r < p.b; ++r) {
      float mx, sum;
      softmax_row(p, logits + r * ld, ks, blk * p.b + r, slope, s, true, 0.f, mx, sum);
      lse[r] = mx == kNegInf ? kNegInf : mx + std::log(sum);
      inv[r] = sum > 0.f ? 1.f / sum : 0.f;
    }
    gemm_nn(p.b, p.Dv, lw, logits, ld, vw, p.Dv, false, out, p.Dv);
    gemm_nn(p.b, p.Dv, ls, logits + lw, ld, sv, p.Dv, true, out, p.Dv);
    for (const Run& run : s.runs)
      gemm_nn(p.b, p.Dv, run.count, logits + lw + ls + run.offset, ld, p.v + (ks.bh_kv * p.n + run.key0) * p.Dv, p.Dv,
              true, out, p.Dv);
    gemm_nn(p.b, p.Dv, lg, logits + lx, ld, s.vg.data(), p.Dv, true, out, p.Dv);
    for (int64_t r = 0; r < p.b; ++r) {
      float* o = out + r * p.Dv;
      at::vec::map([f = inv[r]](Vec x) { return x * Vec(f); }, o, o, p.Dv);
    }
  }
}

// --- backward: recompute p from the lse, dS = p (dp - delta), then dq, dk, dv by gemm -----------------------
struct Grads {
  const float *dout, *o;
  int64_t sdB, sdH, sdN, soB, soH, soN;
  float *dq, *dk, *dv, *dsk, *dsv;
  double* dslopes;  // [B, H]: one slot per batch entry and head (a sum of many signed terms)
};

// dS = p (dp - delta), stored times scale (what dq and dK multiply it by) in place over [0, count); returns
// sum dS |i - pos| (the slope's gradient, negated, without the scale) if asked.
float ds_row(float* dp, const float* prob, int64_t count, float delta, float scale, bool alibi, float fi,
             int64_t pos0, const float* pos) {
  DANON_PHASE(2);
  const Vec vdelta(delta), vscale(scale), vi(fi), iota = Vec::arange(0.f, 1.f);
  Vec vacc(0.f);
  int64_t c = 0;
  for (; c + Vec::size() <= count; c += Vec::size()) {
    const Vec ds = Vec::loadu(prob + c) * (Vec::loadu(dp + c) - vdelta);
    (ds * vscale).store(dp + c);
    if (alibi) {
      const Vec p = pos != nullptr ? Vec::loadu(pos + c) : iota + Vec(static_cast<float>(pos0 + c));
      vacc = vacc + ds * (vi - p).abs();
    }
  }
  float acc = alibi ? at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vacc) : 0.f;
  for (; c < count; ++c) {
    const float ds = prob[c] * (dp[c] - delta);
    dp[c] = ds * scale;
    if (alibi) acc += ds * std::abs(fi - (pos != nullptr ? pos[c] : static_cast<float>(pos0 + c)));
  }
  return acc;
}

// dk and dv start uninitialised: a key block's rows are zeroed when first written, while they are about to be
// in cache (a separate fill of two [n, D] tensors cost about 5 % of the backward at N = 16k); the driver zeroes
// the blocks nothing wrote once the (batch, kv head) is done.
void claim_key_blocks(const Plan& p, const Grads& gr, int64_t bh_kv, int64_t lo, int64_t hi, Scratch& s) {
  for (int64_t j = lo; j <= hi; ++j) {
    if (s.zeroed[j]) continue;
    s.zeroed[j] = 1;
    std::fill_n(gr.dk + (bh_kv * p.n + j * p.b) * p.D, p.b * p.D, 0.f);
    std::fill_n(gr.dv + (bh_kv * p.n + j * p.b) * p.Dv, p.b * p.Dv, 0.f);
  }
}

void backward_block(const Plan& p, const Grads& gr, int64_t bb, int64_t hk, int64_t t, Scratch& s) {
  const KeySet ks = key_set(p, bb, hk, t, s);
  const int64_t bh_kv = ks.bh_kv, blk = ks.blk, lw = ks.lw, ls = ks.ls, lx = ks.lx, lg = ks.lg, L = ks.L;
  const int64_t key0 = ks.key0;
  const int64_t ld = row_stride(p);  // one row stride for every tile, as in run_item
  const float *kw = ks.kw, *vw = ks.vw;
  // the in-place summaries (ls > 0): their keys, values and gradient rows, and positions (ALiBi)
  const int64_t srow = bh_kv * p.S + ks.s0;
  const float* sk = ls > 0 ? p.sk + srow * p.D : nullptr;
  float* dsk = ls > 0 ? gr.dsk + srow * p.D : nullptr;
  float* dsv = ls > 0 ? gr.dsv + srow * p.Dv : nullptr;
  const float* range_pos = ls > 0 && p.summary_pos != nullptr ? p.summary_pos + srow : nullptr;
  if (L == 0) {  // no key: dq is 0 for these rows
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t h = hk * p.G + g;
      std::fill_n(gr.dq + ((bb * p.H + h) * p.tq * p.b + t * p.b) * p.D, p.b * p.D, 0.f);
    }
    return;
  }
  if (lw > 0) claim_key_blocks(p, gr, bh_kv, key0 / p.b, (key0 + lw) / p.b - 1, s);
  for (const Run& run : s.runs) claim_key_blocks(p, gr, bh_kv, run.key0 / p.b, (run.key0 + run.count) / p.b - 1, s);
  if (lw > 0) transpose_key_blocks(p, s, bh_kv, key0 / p.b, (key0 + lw) / p.b - 1);
  float* dkw = gr.dk + (bh_kv * p.n + key0) * p.D;
  float* dvw = gr.dv + (bh_kv * p.n + key0) * p.Dv;
  const bool alibi = p.slopes != nullptr;
  float* prob = s.logits.data();
  float* dp = s.dp.data();
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t h = hk * p.G + g;
    const float* q = p.q + bb * p.sqB + h * p.sqH + t * p.b * p.sqN;
    const float* dout = gr.dout + bb * gr.sdB + h * gr.sdH + t * p.b * gr.sdN;
    const float* o = gr.o + bb * gr.soB + h * gr.soH + t * p.b * gr.soN;
    const float* lse = p.lse + (bb * p.H + h) * p.tq * p.b + t * p.b;
    float* dq = gr.dq + ((bb * p.H + h) * p.tq * p.b + t * p.b) * p.D;
    const float slope = alibi ? p.slopes[h] : 0.f;
    gemm_transposed_blocks(p, p.b, key0, lw, p.D, q, p.sqN, s.kt.get(), prob, ld);  // the whole window, as forward
    gemm_transposed_blocks(p, p.b, key0, lw, p.Dv, dout, gr.sdN, s.vt.get(), dp, ld);
    gemm_nn(p.b, ls, p.D, q, p.sqN, s.skt.get() + ks.s0, s.lds, false, prob + lw, ld);
    gemm_nn(p.b, ls, p.Dv, dout, gr.sdN, s.svt.get() + ks.s0, s.lds, false, dp + lw, ld);
    for (const Run& run : s.runs) {
      const int64_t col = lw + ls + run.offset;
      gemm_transposed_blocks(p, p.b, run.key0, run.count, p.D, q, p.sqN, s.kt.get(), prob + col, ld);
      gemm_transposed_blocks(p, p.b, run.key0, run.count, p.Dv, dout, gr.sdN, s.vt.get(), dp + col, ld);
    }
    gemm_nn(p.b, lg, p.D, q, p.sqN, s.kgt.data(), s.ldg, false, prob + lx, ld);
    gemm_nn(p.b, lg, p.Dv, dout, gr.sdN, s.vgt.data(), s.ldg, false, dp + lx, ld);
    double slope_grad = 0.;
    for (int64_t r = 0; r < p.b; ++r) {
      float* row = prob + r * ld;
      const int64_t i = blk * p.b + r;
      const float fi = static_cast<float>(i);
      if (lse[r] == kNegInf) {  // a row that saw no key: p = 0, dS = 0
        std::fill(row, row + L, 0.f);
        std::fill(dp + r * ld, dp + r * ld + L, 0.f);
        continue;
      }
      float unused_max, unused_sum;
      softmax_row(p, row, ks, i, slope, s, false, lse[r], unused_max, unused_sum);
      const float delta = at::vec::map2_reduce_all<float>(
          [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, dout + r * gr.sdN, o + r * gr.soN,
          p.Dv);
      float* dprow = dp + r * ld;
      // dS = p (dp - delta): 0 past the row's last visible key, where p is 0; dp there (later keys' values) is set
      // to 0 first, so that a value that is not finite cannot make it NaN. Without ALiBi one pass over the padded
      // row (the padding's dp set to 0 too); with it, per segment (positions).
      const int64_t visible = visible_window_keys(p, lw, key0, i);
      std::fill(dprow + visible, dprow + lw, 0.f);
      if (!alibi) {
        std::fill(dprow + L, dprow + padded(L), 0.f);
        ds_row(dprow, row, padded(L), delta, p.scale, false, fi, 0, nullptr);
        continue;
      }
      slope_grad += ds_row(dprow, row, lw, delta, p.scale, alibi, fi, key0, nullptr);
      slope_grad += ds_row(dprow + lw, row + lw, ls, delta, p.scale, alibi, fi, 0, range_pos);
      for (const Run& run : s.runs) {
        const int64_t col = lw + ls + run.offset;
        slope_grad += ds_row(dprow + col, row + col, run.count, delta, p.scale, alibi, fi, run.key0, nullptr);
      }
      slope_grad += ds_row(dprow + lx, row + lx, lg, delta, p.scale, alibi, fi, 0, s.pos.data());
    }
    if (alibi) gr.dslopes[bb * p.H + h] -= slope_grad;
    // dq = (scale dS) . K;  dK += (scale dS)^T . Q;  dV += p^T . dout
    gemm_nn(p.b, p.D, lw, dp, ld, kw, p.D, false, dq, p.D);
    gemm_nn(p.b, p.D, ls, dp + lw, ld, sk, p.D, true, dq, p.D);
    // the listed blocks' dK and dV summed over the G heads in the scratch (after the gathered keys' rows), then added
    // to dk and dv once: one rounding of the running sums per query block, as for the gathered keys (the global
    // blocks' rows gather a term from every query block)
    for (const Run& run : s.runs) {
      const int64_t col = lw + ls + run.offset, part = lg + run.offset;  // its first column; its first row in dkg
      gemm_nn(p.b, p.D, run.count, dp + col, ld, p.k + (bh_kv * p.n + run.key0) * p.D, p.D, true, dq, p.D);
      gemm(true, false, run.count, p.D, p.b, 1.f, dp + col, ld, q, p.sqN, g > 0 ? 1.f : 0.f, s.dkg.data() + part * p.D,
           p.D);
      gemm(true, false, run.count, p.Dv, p.b, 1.f, prob + col, ld, dout, gr.sdN, g > 0 ? 1.f : 0.f,
           s.dvg.data() + part * p.Dv, p.Dv);
    }
    gemm_nn(p.b, p.D, lg, dp + lx, ld, s.kg.data(), p.D, true, dq, p.D);
    gemm(true, false, lw, p.D, p.b, 1.f, dp, ld, q, p.sqN, 1.f, dkw, p.D);
    gemm(true, false, lw, p.Dv, p.b, 1.f, prob, ld, dout, gr.sdN, 1.f, dvw, p.Dv);
    gemm(true, false, ls, p.D, p.b, 1.f, dp + lw, ld, q, p.sqN, 1.f, dsk, p.D);
    gemm(true, false, ls, p.Dv, p.b, 1.f, prob + lw, ld, dout, gr.sdN, 1.f, dsv, p.Dv);
    gemm(true, false, lg, p.D, p.b, 1.f, dp + lx, ld, q, p.sqN, g > 0 ? 1.f : 0.f, s.dkg.data(), p.D);
    gemm(true, false, lg, p.Dv, p.b, 1.f, prob + lx, ld, dout, gr.sdN, g > 0 ? 1.f : 0.f, s.dvg.data(), p.Dv);
  }
  // the listed blocks' and the gathered keys' gradients back where they came from (this thread owns the kv head)
  DANON_PHASE(3);
  for (const Run& run : s.runs) {
    const int64_t part = lg + run.offset;
    float* dk_rows = gr.dk + (bh_kv * p.n + run.key0) * p.D;
    float* dv_rows = gr.dv + (bh_kv * p.n + run.key0) * p.Dv;
    at::vec::map2([](Vec a, Vec b) { return a + b; }, dk_rows, dk_rows, s.dkg.data() + part * p.D, run.count * p.D);
    at::vec::map2([](Vec a, Vec b) { return a + b; }, dv_rows, dv_rows, s.dvg.data() + part * p.Dv, run.count * p.Dv);
  }
  for (int64_t m = 0; m < lg; ++m) {
    const int64_t src = s.src[m];
    if (src >= 0) claim_key_blocks(p, gr, bh_kv, src / p.b, src / p.b, s);
    float* dk_row = src >= 0 ? gr.dk + (bh_kv * p.n + src) * p.D : gr.dsk + (bh_kv * p.S + (-1 - src)) * p.D;
    float* dv_row = src >= 0 ? gr.dv + (bh_kv * p.n + src) * p.Dv : gr.dsv + (bh_kv * p.S + (-1 - src)) * p.Dv;
    const float* gk = s.dkg.data() + m * p.D;
    const float* gv = s.dvg.data() + m * p.Dv;
    at::vec::map2([](Vec a, Vec b) { return a + b; }, dk_row, dk_row, gk, p.D);
    at::vec::map2([](Vec a, Vec b) { return a + b; }, dv_row, dv_row, gv, p.Dv);
  }
}

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

const int32_t* index_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<int32_t>() : nullptr;
}

// q [B, H, Tq*b, D] (last dim contiguous); k [B, Hkv, n, D], v [B, Hkv, n, Dv] contiguous, n = tk*b;
// key_bias [B, n] (0 or -inf; -inf past the real keys; None: every key is real); block_idx / token_idx / summary_idx
// int32 [B, Hkv, Tq, K];
// summary_k [B, Hkv, S, D], summary_v [B, Hkv, S, Dv], summary_bias (log n_s) and summary_pos [B, Hkv, S];
// slopes [H]. Returns out [B, H, Tq*b, Dv] and lse [B, H, Tq*b], fp32.
#define DANON_PLAN_ARGS                                                                                         \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const std::optional<at::Tensor>&key_bias,       \
      const std::optional<at::Tensor>&block_idx, const std::optional<at::Tensor>&token_idx,                     \
      const std::optional<at::Tensor>&summary_idx, const std::optional<at::Tensor>&summary_k,                   \
      const std::optional<at::Tensor>&summary_v, const std::optional<at::Tensor>&summary_bias,                  \
      const std::optional<at::Tensor>&summary_pos, const std::optional<at::Tensor>&slopes, double scale,        \
      bool causal, int64_t block_size, int64_t window, int64_t first

Plan make_plan(DANON_PLAN_ARGS) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "danon_cpu: float32 only");
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1, "q must be [B, H, Nq, D] with a contiguous last dim");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "k and v must be contiguous");
  TORCH_CHECK(!key_bias.has_value() || !key_bias->defined() || key_bias->is_contiguous(), "key_bias must be contiguous");
  TORCH_CHECK(block_size >= 1 && block_size <= 1024, "block_size must be in 1 .. 1024");
  Plan p{};
  p.B = q.size(0); p.H = q.size(1); p.D = q.size(3);
  p.Hkv = k.size(1); p.n = k.size(2); p.Dv = v.size(3);
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == p.B && v.size(0) == p.B && k.size(3) == p.D &&
              v.size(1) == p.Hkv && v.size(2) == p.n && p.Hkv > 0 && p.H % p.Hkv == 0,
              "k [B, Hkv, n, D] and v [B, Hkv, n, Dv] must match q [B, H, Nq, D] with H a multiple of Hkv");
  p.G = p.H / p.Hkv;
  p.b = block_size; p.tq = q.size(2) / block_size; p.tk = p.n / block_size; p.first = first;
  TORCH_CHECK(p.tq * p.b == q.size(2) && p.tk * p.b == p.n, "q and k rows must be whole blocks");
  p.window = window; p.causal = causal; p.scale = static_cast<float>(scale);
  p.raw_units = p.scale > 0.f && std::isfinite(p.scale) && std::isfinite(1.f / p.scale);
  p.unit = p.raw_units ? p.scale : 1.f;
  p.q = q.data_ptr<float>(); p.k = k.data_ptr<float>(); p.v = v.data_ptr<float>();
  p.key_bias = data_or_null(key_bias); p.slopes = data_or_null(slopes);
  p.sqB = q.stride(0); p.sqH = q.stride(1); p.sqN = q.stride(2);
  TORCH_CHECK(p.sqN >= p.D, "q's row stride is BLAS's leading dimension: it must be >= D (make q contiguous)");
  p.block_idx = index_or_null(block_idx); p.token_idx = index_or_null(token_idx);
  p.summary_idx = index_or_null(summary_idx);
  p.kb = p.block_idx ? block_idx->size(3) : 0;
  p.kt = p.token_idx ? token_idx->size(3) : 0;
  p.ks = p.summary_idx ? summary_idx->size(3) : 0;
  p.sk = data_or_null(summary_k); p.sv = data_or_null(summary_v);
  p.summary_bias = data_or_null(summary_bias); p.summary_pos = data_or_null(summary_pos);
  p.S = p.sk ? summary_k->size(2) : 0;
  TORCH_CHECK(p.sk == nullptr || (summary_k->is_contiguous() && summary_v->is_contiguous() &&
                                  summary_k->sizes() == at::IntArrayRef({p.B, p.Hkv, p.S, p.D}) &&
                                  summary_v->sizes() == at::IntArrayRef({p.B, p.Hkv, p.S, p.Dv})),
              "summary_k [B, Hkv, S, D] and summary_v [B, Hkv, S, Dv] must be contiguous");
  TORCH_CHECK(p.summary_idx == nullptr || (p.sk && p.sv && p.summary_bias), "summaries need their keys, values, bias");
  return p;
}


Scratch make_scratch(const Plan& p, bool backward) {
  const int64_t m = std::max<int64_t>(1, max_listed(p));
  Scratch s;
  s.backward = backward;
  s.ldg = (m + 15) / 16 * 16 + 16;  // kgt's rows 16 floats longer than needed: no cache-set aliasing at m = 2^k
  s.kt.reset(new float[p.n * p.D]);
  s.kt_ready.resize(p.tk);
  s.kgt.resize(p.D * s.ldg);
  if (backward) {
    s.vt.reset(new float[p.n * p.Dv]);
    s.vgt.resize(p.Dv * s.ldg);
    s.kg.resize(m * p.D);
  } else {
    s.vg.resize(m * p.Dv);
  }
  s.bias.resize(m + Vec::size());
  s.pos.resize(m + Vec::size());
  s.logits.resize(p.b * row_stride(p));
  if (p.S > 0) {
    s.lds = p.S + 16;
    s.skt.reset(new float[p.D * s.lds]);
    if (backward) s.svt.reset(new float[p.Dv * s.lds]);
    s.range_bias.resize(p.ks + Vec::size());
  }
  if (backward) {
    s.src.resize(m);
    s.dp.resize(p.b * row_stride(p));
    s.dkg.resize(m * p.D);
    s.dvg.resize(m * p.Dv);
    s.zeroed.resize(p.tk);
  }
  return s;
}

// The forward's work, runs of up to kBlocksPerRun consecutive query blocks of one (batch, kv head; fewer when there
// would be under four runs per thread, so that a short call still uses every thread), split into one
// contiguous range per thread as at::parallel_for would, except that a thread done with its own range takes runs
// from the end of another's. A static split left a core idle whenever the VM slowed the other (OpenMP's wait: 3-4 %
// of the forward's samples at 16k); a shared counter instead would put every head on both threads, each
// transposing the head's keys. By hand: at::parallel_for splits statically and has no work stealing.
constexpr int64_t kBlocksPerRun = 8;

class StealableRanges {
 public:
  StealableRanges(int64_t runs, int64_t threads) : ranges_(std::max<int64_t>(1, std::min(runs, threads))) {
    const int64_t n = count();
    for (int64_t i = 0; i < n; ++i) ranges_[i].pack(runs * i / n, runs * (i + 1) / n);
  }
  int64_t count() const { return static_cast<int64_t>(ranges_.size()); }
  // owner's next run: from the front of its own range, then from the back of the others'; -1 when all are taken
  int64_t next(int64_t owner) {
    int64_t run = ranges_[owner].take(true);
    for (int64_t i = 1; run < 0 && i < count(); ++i) run = ranges_[(owner + i) % count()].take(false);
    return run;
  }

 private:
  struct alignas(64) Range {  // [front, back) in one word, so that the owner and a thief never take the same run
    std::atomic<uint64_t> word{0};
    void pack(int64_t front, int64_t back) { word = static_cast<uint64_t>(front) << 32 | static_cast<uint64_t>(back); }
    int64_t take(bool front_end) {
      uint64_t w = word.load();
      for (;;) {
        const int64_t front = static_cast<int64_t>(w >> 32), back = static_cast<int64_t>(w & 0xffffffffu);
        if (front >= back) return -1;
        const uint64_t taken = front_end ? (static_cast<uint64_t>(front + 1) << 32 | static_cast<uint64_t>(back))
                                         : (static_cast<uint64_t>(front) << 32 | static_cast<uint64_t>(back - 1));
        if (word.compare_exchange_weak(w, taken)) return front_end ? front : back - 1;
      }
    }
  };
  std::vector<Range> ranges_;
};

// q [B, H, Tq*b, D] (last dim contiguous); k [B, Hkv, n, D], v [B, Hkv, n, Dv] contiguous, n = tk*b;
// key_bias [B, n] (0 or -inf; -inf past the real keys; None: every key is real); block_idx / token_idx / summary_idx
// int32 [B, Hkv, Tq, K];
// summary_k [B, Hkv, S, D], summary_v [B, Hkv, S, Dv], summary_bias (log n_s) and summary_pos [B, Hkv, S];
// slopes [H]. Returns out [B, H, Tq*b, Dv] and lse [B, H, Tq*b], fp32.
std::tuple<at::Tensor, at::Tensor> sparse_forward(DANON_PLAN_ARGS) {
  Plan p = make_plan(q, k, v, key_bias, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_bias,
                     summary_pos, slopes, scale, causal, block_size, window, first);
  auto out = recycled_empty({p.B, p.H, p.tq * p.b, p.Dv});
  auto lse = recycled_empty({p.B, p.H, p.tq * p.b});
  p.out = out.data_ptr<float>(); p.lse = lse.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  const int64_t blocks_per_run = std::clamp<int64_t>(p.B * p.Hkv * p.tq / (4 * threads), 1, kBlocksPerRun);
  const int64_t runs_per_head = (p.tq + blocks_per_run - 1) / blocks_per_run;
  StealableRanges ranges(p.B * p.Hkv * runs_per_head, threads);
  at::parallel_for(0, ranges.count(), 1, [&](int64_t begin, int64_t end) {
    FlushDenormalResults flush;
    Scratch s = make_scratch(p, false);
    for (int64_t owner = begin; owner < end; ++owner)
      for (int64_t run; (run = ranges.next(owner)) >= 0;) {
        const int64_t head = run / runs_per_head, t0 = run % runs_per_head * blocks_per_run;
        for (int64_t t = t0; t < std::min(p.tq, t0 + blocks_per_run); ++t) run_item(p, head * p.tq + t, s);
      }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
  return {out, lse};
}

// The forward's arguments plus grad_out and out [B, H, Tq*b, Dv] (last dim contiguous) and lse [B, H, Tq*b]
// (contiguous), and `splits`. Returns dq [B, H, Tq*b, D], dk [B, Hkv, n, D], dv, d_summary_k [B, Hkv, S, D],
// d_summary_v and d_slopes [B, H] (summed over B by the caller). Work items are (part, batch, kv head): a part is
// one of `splits` runs of consecutive query blocks. Each part writes its own copy of the key-side gradients (dk,
// dv, the summaries', the slopes'), so a thread owns what it adds to and there are no atomics; with more than one
// part the copies are summed at the end (what lets a call with fewer (batch, kv head) pairs than threads use
// them all, for the memory of `splits` copies).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_backward(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse, DANON_PLAN_ARGS, int64_t splits) {
  Plan p = make_plan(q, k, v, key_bias, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_bias,
                     summary_pos, slopes, scale, causal, block_size, window, first);
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
              lse.scalar_type() == at::kFloat, "danon_cpu: float32 only");
  TORCH_CHECK(grad_out.stride(3) == 1 && out.stride(3) == 1 && lse.is_contiguous(),
              "grad_out and out need a contiguous last dim, lse contiguous");
  TORCH_CHECK(grad_out.stride(2) >= p.Dv && out.stride(2) >= p.Dv,
              "grad_out's and out's row strides are BLAS's leading dimensions: they must be >= Dv");
  p.lse = lse.data_ptr<float>();
  Grads gr{};
  gr.dout = grad_out.data_ptr<float>(); gr.o = out.data_ptr<float>();
  gr.sdB = grad_out.stride(0); gr.sdH = grad_out.stride(1); gr.sdN = grad_out.stride(2);
  gr.soB = out.stride(0); gr.soH = out.stride(1); gr.soN = out.stride(2);
  TORCH_CHECK(splits >= 1, "splits must be >= 1");
  const int64_t parts = std::min(splits, std::max<int64_t>(p.tq, 1));
  // one copy of each key-side gradient per part (no leading dim with one part: no sum, no view). The parts' copies
  // are summed and dropped before the call returns: kept, they would stay resident through the rest of the
  // backward (a higher peak), so only what the call returns comes from the recycled memory.
  auto per_part = [&](std::vector<int64_t> shape, at::ScalarType dtype, bool zero) {
    if (parts == 1 && !zero) return recycled_empty(shape, dtype);  // returned as it is
    if (parts > 1) shape.insert(shape.begin(), parts);
    auto t = zero ? at::zeros(shape, q.options().dtype(dtype)) : at::empty(shape, q.options().dtype(dtype));
    if (!zero) populate(t.data_ptr(), static_cast<int64_t>(t.nbytes()));
    return t;
  };
  auto dq = recycled_empty({p.B, p.H, p.tq * p.b, p.D});
  auto dk = per_part({p.B, p.Hkv, p.n, p.D}, at::kFloat, false);  // zeroed block by block (claim_key_blocks)
  auto dv = per_part({p.B, p.Hkv, p.n, p.Dv}, at::kFloat, false);
  auto dsk = per_part({p.B, p.Hkv, p.S, p.D}, at::kFloat, true);
  auto dsv = per_part({p.B, p.Hkv, p.S, p.Dv}, at::kFloat, true);
  auto dslopes = per_part({p.B, p.H}, at::kDouble, true);
  // every row of dq, dk and dv is written (dk, dv: claim_key_blocks): recycled memory needs no clearing
  gr.dq = dq.data_ptr<float>();
  const int64_t pairs = p.B * p.Hkv;
  at::parallel_for(0, parts * pairs, 1, [&](int64_t begin, int64_t end) {
    FlushDenormalResults flush;
    Scratch s = make_scratch(p, true);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t part = item / pairs, bh_kv = item % pairs;
      Grads g = gr;  // this part's copies
      g.dk = dk.data_ptr<float>() + part * pairs * p.n * p.D;
      g.dv = dv.data_ptr<float>() + part * pairs * p.n * p.Dv;
      g.dsk = dsk.data_ptr<float>() + part * pairs * p.S * p.D;
      g.dsv = dsv.data_ptr<float>() + part * pairs * p.S * p.Dv;
      g.dslopes = dslopes.data_ptr<double>() + part * p.B * p.H;
      std::fill(s.zeroed.begin(), s.zeroed.end(), uint8_t{0});
      for (int64_t t = part * p.tq / parts; t < (part + 1) * p.tq / parts; ++t)
        backward_block(p, g, bh_kv / p.Hkv, bh_kv % p.Hkv, t, s);
      claim_key_blocks(p, g, bh_kv, 0, p.tk - 1, s);  // the key blocks no query of the part saw: gradient 0
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
  if (parts > 1) return {dq, dk.sum(0), dv.sum(0), dsk.sum(0), dsv.sum(0), dslopes.sum(0)};
  return {dq, dk, dv, dsk, dsv, dslopes};
}

}  // namespace

namespace {
int64_t recycled_bytes() { return RecyclingAllocator::get().kept_bytes(); }
void release_recycled() { RecyclingAllocator::get().release_all(); }
}  // namespace

#ifdef DANON_PROFILE
namespace {
std::vector<double> phase_seconds() {  // and reset
  std::vector<double> out;
  for (auto& ns : phase_ns) out.push_back(ns.exchange(0) * 1e-9);
  return out;
}
}  // namespace
#endif

// TORCH_LIBRARY pastes its namespace argument: one more macro level lets DANON_LIBRARY expand first
#define DANON_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define DANON_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

DANON_TORCH_LIBRARY(DANON_LIBRARY, m) {
  m.def("sparse_forward(Tensor q, Tensor k, Tensor v, Tensor? key_bias, Tensor? block_idx, Tensor? token_idx, "
        "Tensor? summary_idx, Tensor? summary_k, Tensor? summary_v, Tensor? summary_bias, Tensor? summary_pos, "
        "Tensor? slopes, float scale, bool causal, int block_size, int window, int first) -> (Tensor, Tensor)");
  m.def("sparse_backward(Tensor grad_out, Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, Tensor? key_bias, "
        "Tensor? block_idx, Tensor? token_idx, Tensor? summary_idx, Tensor? summary_k, Tensor? summary_v, "
        "Tensor? summary_bias, Tensor? summary_pos, Tensor? slopes, float scale, bool causal, int block_size, "
        "int window, int first, int splits) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // the freed outputs' memory the kernel keeps for its next calls (RecyclingAllocator), and giving it back
  m.def("recycled_bytes() -> int", &recycled_bytes);
  m.def("release_recycled() -> ()", &release_recycled);
#ifdef DANON_PROFILE
  m.def("phase_seconds() -> float[]", &phase_seconds);
#endif
}

DANON_TORCH_LIBRARY_IMPL(DANON_LIBRARY, CPU, m) {
  m.impl("sparse_forward", &sparse_forward);
  m.impl("sparse_backward", &sparse_backward);
}
