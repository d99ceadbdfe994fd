// y = x W^T for int8 weights W [N, K] (one scale per row) on AVX512-VNNI, built by int8_kernel.py.
//
// x is quantized on the fly to 8 bits per block of 64 inputs (a scale per block, as llama.cpp does
// with its Q8 activations), so each block of products is one VNNI instruction: 64 multiply-adds
// of u8 x s8 into 16 int32 lanes. VNNI multiplies unsigned by signed bytes, so x is stored as
// q + 128 and 128 * (sum of the block's weights) is taken off again.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t BLOCK = 64;  // inputs per activation scale: one VNNI instruction
constexpr int ROWS = 4;        // weight rows per tile
constexpr int TOKENS = 4;      // activation rows per tile

// Per row of x and block of 64 inputs: q + 128 in [1, 255] and the block's scale.
void quantize_rows(const float* x, int64_t m_total, int64_t k_total, uint8_t* q, float* scales) {
    const int64_t blocks = k_total / BLOCK;
    at::parallel_for(0, m_total * blocks, 64, [&](int64_t begin, int64_t end) {
        for (int64_t index = begin; index < end; ++index) {
            const float* in = x + index * BLOCK;
            __m512 top = _mm512_setzero_ps();
            for (int64_t k = 0; k < BLOCK; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(in + k)));
            const float amax = _mm512_reduce_max_ps(top);
            const float scale = amax > 0.f ? amax / 127.f : 1.f;
            scales[index] = scale;
            const __m512 inverse = _mm512_set1_ps(1.f / scale);
            const __m512i offset = _mm512_set1_epi32(128);
            for (int64_t k = 0; k < BLOCK; k += 16) {
                __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(in + k), inverse));  // round to nearest
                v = _mm512_add_epi32(v, offset);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(q + index * BLOCK + k), _mm512_cvtusepi32_epi8(v));
            }
        }
    });
}

template <int NR, int MT>
inline void tile(const uint8_t* q, const float* xs, const int8_t* w, const float* sums, const float* ws,
                 float* y, int64_t k_total, int64_t n_total, int64_t m0, int64_t n0) {
    const int64_t blocks = k_total / BLOCK;
    __m512 acc[MT][NR];
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        __m512i wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(w + (n0 + j) * k_total + b * BLOCK);
        for (int i = 0; i < MT; ++i) {
            const __m512i xv = _mm512_loadu_si512(q + (m0 + i) * k_total + b * BLOCK);
            const __m512 scale = _mm512_set1_ps(xs[(m0 + i) * blocks + b]);
            for (int j = 0; j < NR; ++j) {
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, wv[j]);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][j]);
            }
        }
    }
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NR; ++j) {
            const int64_t m = m0 + i, n = n0 + j;
            // The offset's share: over blocks, x's scale x 128 x the block's weight sum.
            float correction = 0.f;
            for (int64_t b = 0; b < blocks; ++b) correction += xs[m * blocks + b] * sums[n * blocks + b];
            y[m * n_total + n] = (_mm512_reduce_add_ps(acc[i][j]) - correction) * ws[n];
        }
}

template <int NR>
inline void tokens(int64_t mt, const uint8_t* q, const float* xs, const int8_t* w, const float* c, const float* ws,
                   float* y, int64_t k, int64_t n, int64_t m0, int64_t n0) {
    switch (mt) {
        case 4: tile<NR, 4>(q, xs, w, c, ws, y, k, n, m0, n0); break;
        case 3: tile<NR, 3>(q, xs, w, c, ws, y, k, n, m0, n0); break;
        case 2: tile<NR, 2>(q, xs, w, c, ws, y, k, n, m0, n0); break;
        default: tile<NR, 1>(q, xs, w, c, ws, y, k, n, m0, n0); break;
    }
}

// x [M, K] (float32 or bfloat16), weight [N, K] int8, scale [N] float32, block_sums [N, K / 64]
// float32 (128 * the sum of each block's weights): y [M, N] in x's dtype.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& block_sums) {
    TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "int8_linear: shapes");
    TORCH_CHECK(x.size(1) % BLOCK == 0, "int8_linear: K must be a multiple of 64");
    TORCH_CHECK(weight.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat
                && block_sums.scalar_type() == at::kFloat, "int8_linear: dtypes");
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const at::Tensor w = weight.contiguous(), ws = scale.contiguous(), sums = block_sums.contiguous();
    const int64_t m_total = xf.size(0), k_total = xf.size(1), n_total = w.size(0), blocks = k_total / BLOCK;
    at::Tensor q = at::empty({m_total, k_total}, xf.options().dtype(at::kByte));
    at::Tensor xs = at::empty({m_total, blocks}, xf.options());
    quantize_rows(xf.data_ptr<float>(), m_total, k_total, q.data_ptr<uint8_t>(), xs.data_ptr<float>());
    at::Tensor y = at::empty({m_total, n_total}, xf.options());
    const uint8_t* qp = q.data_ptr<uint8_t>();
    const float *xsp = xs.data_ptr<float>(), *cp = sums.data_ptr<float>(), *wsp = ws.data_ptr<float>();
    const int8_t* wp = w.data_ptr<int8_t>();
    float* yp = y.data_ptr<float>();
    const int64_t row_tiles = (n_total + ROWS - 1) / ROWS;
    at::parallel_for(0, row_tiles, 8, [&](int64_t begin, int64_t end) {
        for (int64_t tile_index = begin; tile_index < end; ++tile_index) {
            const int64_t n0 = tile_index * ROWS, nr = std::min<int64_t>(ROWS, n_total - n0);
            for (int64_t m0 = 0; m0 < m_total; m0 += TOKENS) {
                const int64_t mt = std::min<int64_t>(TOKENS, m_total - m0);
                switch (nr) {
                    case 4: tokens<4>(mt, qp, xsp, wp, cp, wsp, yp, k_total, n_total, m0, n0); break;
                    case 3: tokens<3>(mt, qp, xsp, wp, cp, wsp, yp, k_total, n_total, m0, n0); break;
                    case 2: tokens<2>(mt, qp, xsp, wp, cp, wsp, yp, k_total, n_total, m0, n0); break;
                    default: tokens<1>(mt, qp, xsp, wp, cp, wsp, yp, k_total, n_total, m0, n0); break;
                }
            }
        }
    });
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(lckv, m) {
    m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor block_sums) -> Tensor");
}

TORCH_LIBRARY_IMPL(lckv, CPU, m) { m.impl("int8_linear", &int8_linear); }
