// y = x W^T for 4-bit weights on AVX512-VNNI, built with int8_kernel.cpp by int8_kernel.py.
//
// W is stored as q in [0, 15] per row and group of G inputs (G = 32 or 64) with a scale d and a
// minimum m per group, w ~ d q + m (llama.cpp's Q4_1). x is quantized on the fly to signed 8 bits
// per block of 64 inputs (scale s), so a group's products are
//     sum w x ~ d s sum(q xq) + m s sum(xq),
// and sum(q xq) is one VNNI instruction per 64 inputs with the weights as its unsigned operand.
// (Taking sum(x) exact instead would leave the rounding of x weighted by d q = w - m rather than by
// w, which is larger: the minimum sits at the low end of the group.)
//
// Kernel order: within a block of 64 inputs, weights and activations are stored permuted so that
// VNNI lane l (which sums 4 adjacent bytes) holds inputs 4 (l / 2) + 32 (l % 2) .. + 3: with groups
// of 32 the even lanes belong to the block's first group and the odd ones to its second, and one
// broadcast pair of scales scales them all. Two nibbles a byte: byte j of a block holds position j in
// its low nibble and position 32 + j in its high one, so one 32-byte load broadcast to both halves of
// a register and one mask give the block's 64 weights (the upper half as 16 q, which fits a byte:
// its products are scaled by 1/16 with the rest).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK = 64;  // inputs per activation scale and per VNNI instruction
constexpr int ROWS = 4;        // weight rows per tile
constexpr int TOKENS = 4;      // activation rows per tile

// Per row of x: q in [-127, 127] in kernel order and a scale s per block of 64, s sum(q) per group.
void quantize_rows(const float* x, int64_t m_total, int64_t k_total, int64_t group, int8_t* q, float* scales,
                   float* sums) {
    const int64_t blocks = k_total / BLOCK, per_block = BLOCK / group;
    // Kernel order: lane l of a block holds inputs 4 (l / 2) + 32 (l % 2) .. + 3 (see the top).
    const __m512i order = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    at::parallel_for(0, m_total * blocks, 64, [&](int64_t begin, int64_t end) {
        for (int64_t index = begin; index < end; ++index) {
            const float* in = x + index * BLOCK;
            __m512 v[4], top = _mm512_setzero_ps();
            for (int i = 0; i < 4; ++i) {
                v[i] = _mm512_loadu_ps(in + 16 * i);
                top = _mm512_max_ps(top, _mm512_abs_ps(v[i]));
            }
            const float amax = _mm512_reduce_max_ps(top);
            const float scale = amax > 0.f ? amax / 127.f : 1.f;
            scales[index] = scale;
            const __m512 inverse = _mm512_set1_ps(1.f / scale);
            __m512i r[4];
            for (int i = 0; i < 4; ++i) r[i] = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inverse));  // round to nearest
            __m512i bytes = _mm512_castsi128_si512(_mm512_cvtsepi32_epi8(r[0]));
            bytes = _mm512_inserti32x4(bytes, _mm512_cvtsepi32_epi8(r[1]), 1);
            bytes = _mm512_inserti32x4(bytes, _mm512_cvtsepi32_epi8(r[2]), 2);
            bytes = _mm512_inserti32x4(bytes, _mm512_cvtsepi32_epi8(r[3]), 3);
            _mm512_storeu_si512(q + index * BLOCK, _mm512_permutexvar_epi32(order, bytes));
            if (per_block == 1) {
                sums[index] = scale * _mm512_reduce_add_epi32(
                    _mm512_add_epi32(_mm512_add_epi32(r[0], r[1]), _mm512_add_epi32(r[2], r[3])));
            } else {
                sums[2 * index] = scale * _mm512_reduce_add_epi32(_mm512_add_epi32(r[0], r[1]));
                sums[2 * index + 1] = scale * _mm512_reduce_add_epi32(_mm512_add_epi32(r[2], r[3]));
            }
        }
    });
}

// The scales and minimums of NR rows as float32 [NR][groups] (stored as float16).
template <int NR>
inline void widen(const at::Half* d, const at::Half* m, int64_t groups, int64_t n0, float* d_out, float* m_out) {
    for (int j = 0; j < NR; ++j) {
        const uint16_t* dr = reinterpret_cast<const uint16_t*>(d + (n0 + j) * groups);
        const uint16_t* mr = reinterpret_cast<const uint16_t*>(m + (n0 + j) * groups);
        for (int64_t g = 0; g < groups; g += 16) {
            const __mmask16 mask = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
            _mm512_mask_storeu_ps(d_out + j * groups + g, mask, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dr + g)));
            _mm512_mask_storeu_ps(m_out + j * groups + g, mask, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mr + g)));
        }
    }
}

template <int G, int NR, int MT>
inline void tile(const int8_t* q, const float* xs, const float* xsum, const uint8_t* w, const float* d,
                 const float* mn, float* y, int64_t k_total, int64_t n_total, int64_t m0, int64_t n0) {
    const int64_t blocks = k_total / BLOCK, groups = k_total / G, row_bytes = k_total / 2;
    // The low nibbles in the lower half, the high ones (16 q) in the upper half; 1/16 is in the scales.
    const __m512i nibbles = _mm512_inserti64x4(_mm512_set1_epi8(0x0F), _mm256_set1_epi8(static_cast<char>(0xF0)), 1);
    const __m512 unshift = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(1.f), _mm512_set1_ps(1.f / 16));
    __m512 acc[MT][NR];
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        __m512i wv[NR];
        for (int j = 0; j < NR; ++j) {
            const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + j) * row_bytes + b * 32));
            wv[j] = _mm512_and_si512(_mm512_broadcast_i64x4(packed), nibbles);
        }
        __m512 dv[NR];  // the rows' scales in the lanes their groups' products land in
        for (int j = 0; j < NR; ++j) {
            if constexpr (G == 64) {
                dv[j] = _mm512_set1_ps(d[j * groups + b]);
            } else {
                double pair;  // groups 2b (even lanes) and 2b + 1 (odd lanes)
                std::memcpy(&pair, d + j * groups + 2 * b, sizeof(pair));
                dv[j] = _mm512_castpd_ps(_mm512_set1_pd(pair));
            }
        }
        for (int i = 0; i < MT; ++i) {
            const __m512i xv = _mm512_loadu_si512(q + (m0 + i) * k_total + b * BLOCK);
            const __m512 s = _mm512_mul_ps(_mm512_set1_ps(xs[(m0 + i) * blocks + b]), unshift);
            for (int j = 0; j < NR; ++j) {
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[j], xv);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv[j], s), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < MT; ++i) {
        const float* sums = xsum + (m0 + i) * groups;
        for (int j = 0; j < NR; ++j) {
            __m512 total = acc[i][j];  // + the minimums' share: sum over groups of m s sum(xq)
            for (int64_t g = 0; g < groups; g += 16) {
                const __mmask16 mask = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
                total = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, mn + j * groups + g),
                                        _mm512_maskz_loadu_ps(mask, sums + g), total);
            }
            y[(m0 + i) * n_total + n0 + j] = _mm512_reduce_add_ps(total);
        }
    }
}

template <int G, int NR>
inline void rows(int64_t m_total, const int8_t* q, const float* xs, const float* xsum, const uint8_t* w,
                 const float* d, const float* mn, float* y, int64_t k, int64_t n, int64_t n0) {
    for (int64_t m0 = 0; m0 < m_total; m0 += TOKENS) {
        switch (std::min<int64_t>(TOKENS, m_total - m0)) {
            case 4: tile<G, NR, 4>(q, xs, xsum, w, d, mn, y, k, n, m0, n0); break;
            case 3: tile<G, NR, 3>(q, xs, xsum, w, d, mn, y, k, n, m0, n0); break;
            case 2: tile<G, NR, 2>(q, xs, xsum, w, d, mn, y, k, n, m0, n0); break;
            default: tile<G, NR, 1>(q, xs, xsum, w, d, mn, y, k, n, m0, n0); break;
        }
    }
}

template <int G>
void product(int64_t m_total, int64_t k_total, int64_t n_total, const int8_t* q, const float* xs, const float* xsum,
             const uint8_t* w, const at::Half* d, const at::Half* m, float* y) {
    const int64_t groups = k_total / G, row_tiles = (n_total + ROWS - 1) / ROWS;
    at::parallel_for(0, row_tiles, 8, [&](int64_t begin, int64_t end) {
        std::vector<float> d32(ROWS * groups), m32(ROWS * groups);
        for (int64_t tile_index = begin; tile_index < end; ++tile_index) {
            const int64_t n0 = tile_index * ROWS, nr = std::min<int64_t>(ROWS, n_total - n0);
            float *dp = d32.data(), *mp = m32.data();
            switch (nr) {
                case 4: widen<4>(d, m, groups, n0, dp, mp); rows<G, 4>(m_total, q, xs, xsum, w, dp, mp, y, k_total, n_total, n0); break;
                case 3: widen<3>(d, m, groups, n0, dp, mp); rows<G, 3>(m_total, q, xs, xsum, w, dp, mp, y, k_total, n_total, n0); break;
                case 2: widen<2>(d, m, groups, n0, dp, mp); rows<G, 2>(m_total, q, xs, xsum, w, dp, mp, y, k_total, n_total, n0); break;
                default: widen<1>(d, m, groups, n0, dp, mp); rows<G, 1>(m_total, q, xs, xsum, w, dp, mp, y, k_total, n_total, n0); break;
            }
        }
    });
}

// x [M, K] (float32 or bfloat16), weight [N, K / 2] uint8 (two 4-bit q a byte, as above), scale and
// minimum [N, K / G] float16 (G = 32 or 64, read from their shape): y [M, N] in x's dtype.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& minimum) {
    TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == 2 * weight.size(1), "int4_linear: shapes");
    TORCH_CHECK(x.size(1) % BLOCK == 0, "int4_linear: K must be a multiple of 64");
    TORCH_CHECK(weight.scalar_type() == at::kByte && scale.scalar_type() == at::kHalf
                && minimum.scalar_type() == at::kHalf, "int4_linear: dtypes");
    TORCH_CHECK(scale.sizes() == minimum.sizes() && scale.size(0) == weight.size(0), "int4_linear: scale shapes");
    const int64_t k_total = x.size(1), groups = scale.size(1);
    TORCH_CHECK(groups > 0 && k_total % groups == 0, "int4_linear: K must be whole groups");
    const int64_t group = k_total / groups;
    TORCH_CHECK(group == 32 || group == 64, "int4_linear: groups of 32 or 64 inputs");
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const at::Tensor w = weight.contiguous(), d = scale.contiguous(), m = minimum.contiguous();
    const int64_t m_total = xf.size(0), n_total = w.size(0), blocks = k_total / BLOCK;
    at::Tensor q = at::empty({m_total, k_total}, xf.options().dtype(at::kChar));
    at::Tensor xs = at::empty({m_total, blocks}, xf.options());
    at::Tensor xsum = at::empty({m_total, groups}, xf.options());
    quantize_rows(xf.data_ptr<float>(), m_total, k_total, group, q.data_ptr<int8_t>(), xs.data_ptr<float>(),
                  xsum.data_ptr<float>());
    at::Tensor y = at::empty({m_total, n_total}, xf.options());
    (group == 64 ? product<64> : product<32>)(m_total, k_total, n_total, q.data_ptr<int8_t>(), xs.data_ptr<float>(),
        xsum.data_ptr<float>(), w.data_ptr<uint8_t>(), d.data_ptr<at::Half>(), m.data_ptr<at::Half>(),
        y.data_ptr<float>());
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lckv, m) {
    m.def("int4_linear(Tensor x, Tensor weight, Tensor scale, Tensor minimum) -> Tensor");
}

TORCH_LIBRARY_IMPL(lckv, CPU, m) { m.impl("int4_linear", &int4_linear); }
