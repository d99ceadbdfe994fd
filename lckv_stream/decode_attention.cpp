// One new token's attention over a cache on AVX512, built with int8_kernel.cpp by int8_kernel.py.
//
// A decode step has a few query rows per KV head (the query heads that share it, one token each);
// torch's fused CPU attention is built for blocks of many query rows. Here each (row, KV head) reads
// its keys and values once for all the query rows that share them, in blocks of 16 slots, and skips
// blocks that no query sees. The slots are cut into splits of SPLIT, each with its own softmax
// statistics, combined at the end (flash-decoding): a batch of one has only 3 KV heads to spread
// over the threads. The split size is fixed, so a row's result does not depend on the batch it is
// in or on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t SPLIT = 256;  // slots per partial softmax
constexpr int LANES = 16;       // floats per register; slots per block
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

#define LCKV_INLINE inline __attribute__((always_inline))
#define LCKV_INLINE_LAMBDA __attribute__((always_inline))

LCKV_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

LCKV_INLINE __m512 load16(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// exp(x) for x <= 0: 2^n exp(r) with |r| <= ln 2 / 2 (the Cephes polynomial, about 1 ulp).
LCKV_INLINE __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

// 16 registers of partial dot products -> one register of their 16 sums, lane i = sum of v[i].
LCKV_INLINE __m512 sum16(const __m512* v) {
    __m512 pairs[8], quads[4], octs[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [a, b, c, d], each a quarter of its sum
        const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; ++i)  // lanes [abcd 0+1, abcd 2+3, efgh 0+1, efgh 2+3]
        octs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(octs[0], octs[1], 0x88), _mm512_shuffle_f32x4(octs[0], octs[1], 0xDD));
}

// Scores of the ROWS query rows against a block of 16 key slots (0 where a slot is not `seen`; FULL:
// all are): each slot's key is read and widened once for every row, its per-row partial dot products
// parked in `dots` [ROWS][16 slots][16 lanes], then summed across lanes per row.
template <int ROWS, int DV, bool FULL, typename KV>
LCKV_INLINE void block_scores(const __m512 (*q)[DV], const KV* k, __mmask16 seen, __m512* scores) {
    alignas(64) float dots[ROWS][LANES][LANES];
#pragma GCC unroll 16
    for (int i = 0; i < LANES; ++i) {
        __m512 dot[ROWS];
        for (int r = 0; r < ROWS; ++r) dot[r] = _mm512_setzero_ps();
        if (FULL || (seen >> i & 1))
            for (int c = 0; c < DV; ++c) {
                const __m512 key = load16(k + i * DV * LANES + c * LANES);
                for (int r = 0; r < ROWS; ++r) dot[r] = _mm512_fmadd_ps(q[r][c], key, dot[r]);
            }
        for (int r = 0; r < ROWS; ++r) _mm512_store_ps(dots[r][i], dot[r]);
    }
    for (int r = 0; r < ROWS; ++r) scores[r] = sum16(reinterpret_cast<const __m512*>(dots[r]));
}

// acc[r] += sum over the block's seen slots of weights[r][slot] * value[slot] (weights: row r at r * stride).
template <int ROWS, int DV, bool FULL, typename KV>
LCKV_INLINE void block_values(__m512 (*acc)[DV], const float* weights, int64_t stride, const KV* v, __mmask16 seen) {
    auto add = [&](int i) LCKV_INLINE_LAMBDA {
        __m512 row[DV];
        for (int c = 0; c < DV; ++c) row[c] = load16(v + i * DV * LANES + c * LANES);
        for (int r = 0; r < ROWS; ++r) {
            const __m512 w = _mm512_set1_ps(weights[r * stride + i]);
            for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_fmadd_ps(w, row[c], acc[r][c]);
        }
    };
    if (FULL) {
#pragma GCC unroll 16
        for (int i = 0; i < LANES; ++i) add(i);
    } else {
        for (unsigned left = seen; left; left &= left - 1) add(__builtin_ctz(left));
    }
}

LCKV_INLINE void prefetch_block(const void* start, int64_t bytes) {
    const char* p = static_cast<const char*>(start);
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(p + line, _MM_HINT_T0);
}

// One split: slots [begin, end) (at most SPLIT) of one (row, KV head) for its ROWS query rows
// (already scaled by 1/sqrt(dim)), in two passes: the scores of every slot (the keys read once), then
// the weighted sum of the values (read once). No rescaling inside a split, and the blocks of a pass
// do not wait on each other. Writes per query row its unnormalized output, then its max score and
// its sum of exponentials: [ROWS][dim + 2].
template <int ROWS, int DV, typename KV>
void attend_split(const float* query, const KV* keys, const KV* head_keys, int64_t head, const KV* values,
                  const bool* visible, int64_t begin, int64_t end, float* partial) {
    constexpr int64_t DIM = DV * LANES, BLOCKS = SPLIT / LANES;
    alignas(64) float scores[ROWS][SPLIT];
    __mmask16 seen[BLOCKS];
    __m512 q[ROWS][DV], top[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        for (int c = 0; c < DV; ++c) q[r][c] = _mm512_loadu_ps(query + r * DIM + c * LANES);
        top[r] = _mm512_set1_ps(NEG_INF);
    }
    const int64_t blocks = (end - begin + LANES - 1) / LANES;
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t j = begin + b * LANES, n = std::min<int64_t>(LANES, end - j);
        const __mmask16 inside = n == LANES ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
        const __m128i flags = _mm_maskz_loadu_epi8(inside, visible + j);
        const __mmask16 mask = seen[b] = _mm_test_epi8_mask(flags, flags);
        if (!mask) continue;  // empty slots or the window's far side: no bytes read
        const KV* k = j < head ? head_keys + j * DIM : keys + j * DIM;  // blocks of 16: never both
        // The block's values are read in the second pass: fetched now, while the scores compute,
        // they come from the near caches then (a batched step's rows overflow them between layers).
        prefetch_block(values + j * DIM, LANES * DIM * sizeof(KV));
        if (j + LANES < end && j + LANES >= head) prefetch_block(keys + (j + LANES) * DIM, LANES * DIM * sizeof(KV));
        __m512 s[ROWS];
        if (mask == 0xFFFF) {
            block_scores<ROWS, DV, true>(q, k, mask, s);
        } else {
            block_scores<ROWS, DV, false>(q, k, mask, s);
            for (int r = 0; r < ROWS; ++r) s[r] = _mm512_mask_blend_ps(mask, _mm512_set1_ps(NEG_INF), s[r]);
        }
        for (int r = 0; r < ROWS; ++r) {
            top[r] = _mm512_max_ps(top[r], s[r]);
            _mm512_store_ps(scores[r] + b * LANES, s[r]);
        }
    }
    __m512 acc[ROWS][DV];
    float tops[ROWS], totals[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        tops[r] = _mm512_reduce_max_ps(top[r]);
        const __m512 shift = _mm512_set1_ps(tops[r]);
        __m512 total = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; ++b) {
            if (!seen[b]) continue;
            float* s = scores[r] + b * LANES;
            const __m512 w = _mm512_maskz_mov_ps(seen[b], exp16(_mm512_sub_ps(_mm512_load_ps(s), shift)));
            total = _mm512_add_ps(total, w);
            _mm512_store_ps(s, w);
        }
        totals[r] = _mm512_reduce_add_ps(total);
        for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < blocks; ++b) {
        const KV* v = values + (begin + b * LANES) * DIM;
        if (seen[b] == 0xFFFF) block_values<ROWS, DV, true>(acc, scores[0] + b * LANES, SPLIT, v, seen[b]);
        else if (seen[b]) block_values<ROWS, DV, false>(acc, scores[0] + b * LANES, SPLIT, v, seen[b]);
    }
    for (int r = 0; r < ROWS; ++r) {
        float* out = partial + r * (DIM + 2);
        for (int c = 0; c < DV; ++c) _mm512_storeu_ps(out + c * LANES, acc[r][c]);
        out[DIM] = tops[r], out[DIM + 1] = totals[r];
    }
}

// The splits of one (row, KV head) combined: out [rows][dim]; a query row that saw no slot gets zeros.
void combine(const float* partial, int64_t splits, int64_t rows, int64_t dim, float* out) {
    for (int64_t r = 0; r < rows; ++r) {
        float top = NEG_INF;
        for (int64_t s = 0; s < splits; ++s) top = std::max(top, partial[(s * rows + r) * (dim + 2) + dim]);
        float* o = out + r * dim;
        std::fill(o, o + dim, 0.f);
        if (top == NEG_INF) continue;
        float total = 0.f;
        for (int64_t s = 0; s < splits; ++s) {
            const float* p = partial + (s * rows + r) * (dim + 2);
            if (p[dim] == NEG_INF) continue;
            const float weight = std::exp(p[dim] - top);
            total += weight * p[dim + 1];
            for (int64_t d = 0; d < dim; ++d) o[d] += weight * p[d];
        }
        for (int64_t d = 0; d < dim; ++d) o[d] /= total;
    }
}

using SplitFn = void (*)(const float*, const void*, const void*, int64_t, const void*, const bool*, int64_t, int64_t,
                         float*);

template <int ROWS, int DV, typename KV>
void split_entry(const float* q, const void* k, const void* head_keys, int64_t head, const void* v,
                 const bool* visible, int64_t begin, int64_t end, float* partial) {
    attend_split<ROWS, DV, KV>(q, static_cast<const KV*>(k), static_cast<const KV*>(head_keys), head,
                               static_cast<const KV*>(v), visible, begin, end, partial);
}

// A float from element `index` of a float32 or bfloat16 tensor's data.
LCKV_INLINE float element(const void* data, bool half, int64_t index) {
    return half ? float(static_cast<const at::BFloat16*>(data)[index]) : static_cast<const float*>(data)[index];
}

LCKV_INLINE void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

LCKV_INLINE void store16(at::BFloat16* p, __m512 v) {  // rounded to nearest even, as at::BFloat16(float)
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

// One sink key x rotated to its place: x cos + rotate_half(x) sin (the Llama convention), 16 lanes at
// a time (half a multiple of 16), each product rounded before the sum as in the scalar loop.
template <typename KV, typename RAW, typename ANGLE>
void rotate_key(const RAW* x, const ANGLE* cos, const ANGLE* sin, int64_t half, KV* y) {
    for (int64_t d = 0; d < half; d += LANES) {
        const __m512 low = load16(x + d), high = load16(x + half + d);
        store16(y + d, _mm512_sub_ps(_mm512_mul_ps(low, load16(cos + d)), _mm512_mul_ps(high, load16(sin + d))));
        store16(y + half + d,
                _mm512_add_ps(_mm512_mul_ps(high, load16(cos + half + d)), _mm512_mul_ps(low, load16(sin + half + d))));
    }
}

template <typename KV, typename RAW>
void rotate_key(const RAW* x, const void* cos, const void* sin, bool angle_half, int64_t half, KV* y) {
    if (angle_half)
        rotate_key(x, static_cast<const at::BFloat16*>(cos), static_cast<const at::BFloat16*>(sin), half, y);
    else
        rotate_key(x, static_cast<const float*>(cos), static_cast<const float*>(sin), half, y);
}

// The first `head` slots' keys (whole blocks of 16) of every (row, KV head) into `out` [batch,
// kv_heads, head, dim] in the keys' type KV, with the sink slots' keys rotated here from the raw sink
// keys [batch, kv_heads, sink, dim] at their place in the row's cache frame (cos/sin [batch, sink,
// dim]): the cache's own sink slots are not rewritten every step. Computed in float32 and rounded to
// KV as the cache would store them. Raw loops, no tensors: at a batch of one the small ATen calls
// this took cost as much as the attention itself.
template <typename KV>
void rotated_head(const KV* keys, int64_t batch, int64_t heads, int64_t slots, int64_t dim,
                  const at::Tensor& sink_keys, const at::Tensor& cos, const at::Tensor& sin, int64_t head, KV* out) {
    const int64_t sink = sink_keys.size(2), half = dim / 2;
    const bool raw_half = sink_keys.scalar_type() == at::kBFloat16, angle_half = cos.scalar_type() == at::kBFloat16;
    const void *rp = sink_keys.data_ptr(), *cp = cos.data_ptr(), *sp = sin.data_ptr();
    const int64_t angle_size = cos.element_size();
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t pair = b * heads + h;
            KV* y = out + pair * head * dim;
            std::copy(keys + pair * slots * dim + sink * dim, keys + pair * slots * dim + head * dim, y + sink * dim);
            for (int64_t s = 0; s < sink; ++s) {
                const int64_t x = (pair * sink + s) * dim, a = (b * sink + s) * dim;
                if (half % LANES == 0) {
                    const void* c = static_cast<const char*>(cp) + a * angle_size;
                    const void* n = static_cast<const char*>(sp) + a * angle_size;
                    if (raw_half)
                        rotate_key(static_cast<const at::BFloat16*>(rp) + x, c, n, angle_half, half, y + s * dim);
                    else
                        rotate_key(static_cast<const float*>(rp) + x, c, n, angle_half, half, y + s * dim);
                    continue;
                }
                for (int64_t d = 0; d < dim; ++d) {  // x cos + rotate_half(x) sin (the Llama convention)
                    const float partner = d < half ? -element(rp, raw_half, x + d + half) : element(rp, raw_half, x + d - half);
                    const float product = element(rp, raw_half, x + d) * element(cp, angle_half, a + d);
                    const float other = partner * element(sp, angle_half, a + d);
                    y[s * dim + d] = KV(product + other);
                }
            }
        }
}

template <typename KV>
SplitFn pick_for(int64_t rows, int64_t dv) {
#define LCKV_ROWS(R)                                                \
    if (rows == R) switch (dv) {                                    \
            case 1: return &split_entry<R, 1, KV>;                  \
            case 2: return &split_entry<R, 2, KV>;                  \
            case 4: return &split_entry<R, 4, KV>;                  \
            case 8: return &split_entry<R, 8, KV>;                  \
        }
    LCKV_ROWS(1) LCKV_ROWS(2) LCKV_ROWS(3) LCKV_ROWS(4)
#undef LCKV_ROWS
    return nullptr;
}

// query [batch, kv_heads, rows, dim] (rows: the query heads sharing a KV head, one token each), keys and
// values [batch, kv_heads, slots, dim] (float32 or bfloat16), visible [batch, slots] bool: which slots
// the row's token sees. Returns softmax(q k^T / sqrt(dim)) v over the visible slots [batch, kv_heads,
// rows, dim] in the query's dtype; zeros for a row that sees no slot. rows <= 4, dim in 16, 32, 64, 128.
// With sink_keys [batch, kv_heads, sink, dim] (un-rotated) and sink_cos/sin [batch, sink, dim], the
// first `sink` slots' keys are those, rotated here, instead of the cache's.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& visible, const std::optional<at::Tensor>& sink_keys,
                            const std::optional<at::Tensor>& sink_cos, const std::optional<at::Tensor>& sink_sin) {
    TORCH_CHECK(query.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes(), "decode_attention: shapes");
    const int64_t batch = query.size(0), heads = query.size(1), rows = query.size(2), dim = query.size(3);
    const int64_t slots = keys.size(2);
    TORCH_CHECK(keys.size(0) == batch && keys.size(1) == heads && keys.size(3) == dim, "decode_attention: keys' shape");
    TORCH_CHECK(visible.dim() == 2 && visible.size(0) == batch && visible.size(1) == slots
                && visible.scalar_type() == at::kBool, "decode_attention: visible must be bool [batch, slots]");
    TORCH_CHECK(keys.scalar_type() == values.scalar_type()
                && (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16),
                "decode_attention: keys and values must both be float32 or bfloat16");
    const bool half = keys.scalar_type() == at::kBFloat16;
    const SplitFn split_fn = dim % LANES ? nullptr : half ? pick_for<at::BFloat16>(rows, dim / LANES)
                                                          : pick_for<float>(rows, dim / LANES);
    TORCH_CHECK(split_fn, "decode_attention: rows ", rows, " and dim ", dim, " are not compiled in");

    // The query scaled into float32, read through its strides (the folded heads are a view).
    std::vector<float> q(batch * heads * rows * dim);
    {
        const bool half = query.scalar_type() == at::kBFloat16;
        TORCH_CHECK(half || query.scalar_type() == at::kFloat, "decode_attention: query must be float32 or bfloat16");
        const float scale = float(1.0 / std::sqrt(double(dim)));
        const void* data = query.data_ptr();
        const auto st = query.strides();
        for (int64_t b = 0, i = 0; b < batch; ++b)
            for (int64_t h = 0; h < heads; ++h)
                for (int64_t r = 0; r < rows; ++r)
                    for (int64_t d = 0; d < dim; ++d, ++i)
                        q[i] = element(data, half, b * st[0] + h * st[1] + r * st[2] + d * st[3]) * scale;
    }
    const at::Tensor k = keys.contiguous(), v = values.contiguous();
    const at::Tensor seen = visible.stride(1) == 1 ? visible : visible.contiguous();
    const int64_t seen_stride = seen.stride(0);
    int64_t head = 0;  // slots whose keys come from `first` (the sinks, rotated here)
    std::vector<char> first;
    const int64_t element_size = k.element_size();
    if (sink_keys.has_value() && sink_keys->size(2) > 0) {
        const int64_t sink = sink_keys->size(2);
        TORCH_CHECK(sink_keys->dim() == 4 && sink_keys->size(0) == batch && sink_keys->size(1) == heads
                    && sink_keys->size(3) == dim && sink <= slots && sink_cos.has_value() && sink_sin.has_value()
                    && sink_cos->sizes() == at::IntArrayRef({batch, sink, dim}) && sink_sin->sizes() == sink_cos->sizes(),
                    "decode_attention: sink_keys [batch, kv_heads, sink, dim] with cos/sin [batch, sink, dim]");
        head = std::min<int64_t>(slots, (sink + LANES - 1) / LANES * LANES);
        const at::Tensor raw = sink_keys->contiguous(), c = sink_cos->contiguous(), s = sink_sin->contiguous();
        first.resize(batch * heads * head * dim * element_size);
        if (half)
            rotated_head(k.data_ptr<at::BFloat16>(), batch, heads, slots, dim, raw, c, s, head,
                         reinterpret_cast<at::BFloat16*>(first.data()));
        else
            rotated_head(k.data_ptr<float>(), batch, heads, slots, dim, raw, c, s, head,
                         reinterpret_cast<float*>(first.data()));
    }
    const int64_t splits = std::max<int64_t>(1, (slots + SPLIT - 1) / SPLIT), pairs = batch * heads;
    std::vector<float> partial(pairs * splits * rows * (dim + 2));
    const bool out_float = query.scalar_type() == at::kFloat;
    at::Tensor out = at::empty({batch, heads, rows, dim}, query.options().memory_format(at::MemoryFormat::Contiguous));
    std::vector<float> staged(out_float ? 0 : pairs * rows * dim);  // bfloat16 out: combined in float32 first
    float* op = out_float ? out.data_ptr<float>() : staged.data();
    const float* qp = q.data();
    const char* kp = static_cast<const char*>(k.data_ptr());
    const char* vp = static_cast<const char*>(v.data_ptr());
    const char* hp = head ? first.data() : kp;
    const bool* sp = seen.data_ptr<bool>();
    float* pp = partial.data();
    at::parallel_for(0, pairs * splits, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
            const int64_t pair = item / splits, s = item % splits, b = pair / heads;
            const int64_t offset = pair * slots * dim * element_size;
            const int64_t head_offset = pair * (head ? head : slots) * dim * element_size;
            split_fn(qp + pair * rows * dim, kp + offset, hp + head_offset, head, vp + offset, sp + b * seen_stride,
                     s * SPLIT, std::min(slots, (s + 1) * SPLIT), pp + item * rows * (dim + 2));
        }
    });
    at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
        for (int64_t pair = begin; pair < end; ++pair)
            combine(pp + pair * splits * rows * (dim + 2), splits, rows, dim, op + pair * rows * dim);
    });
    if (!out_float) {
        at::BFloat16* o = out.data_ptr<at::BFloat16>();
        for (int64_t i = 0; i < pairs * rows * dim; ++i) o[i] = at::BFloat16(staged[i]);
    }
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lckv, m) {
    m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor visible, Tensor? sink_keys=None, "
          "Tensor? sink_cos=None, Tensor? sink_sin=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lckv, CPU, m) { m.impl("decode_attention", &decode_attention); }
