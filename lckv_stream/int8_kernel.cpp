// y = x W^T for int8 weights W [N, K] (one scale per row) on AVX512-VNNI, built by int8_kernel.py.
//
// x is quantized on the fly to 8 bits per block of 64 inputs (a scale per block, as llama.cpp does
// with its Q8 activations), so a block's products are sums of integers: VNNI multiplies 64 pairs of
// bytes (u8 x s8) into 16 int32 lanes an instruction. VNNI multiplies unsigned by signed bytes, so x
// is stored as q + 128 and 128 * (sum of the block's weights) is taken off again.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

namespace {

constexpr int64_t BLOCK = 64;  // inputs per activation scale: one VNNI instruction

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

// The weights are packed for the kernel (int8_kernel.pack): 16 rows at a time, 4 inputs of each
// row side by side, [N / 16][K / 4][16][4] bytes. One 64-byte load is then 4 inputs of 16 rows and
// one VNNI instruction against 4 inputs of x broadcast to every lane adds each row's 4 products in
// its own lane: no sum across lanes, and one conversion to float per 16 rows and block (not per row).
// Each block's integer sums start from -128 x the sum of its weights (the unsigned offset taken off
// exactly, in integers: block_sums, [N / 16][K / 64][16] int32).
template <int MT>
inline void group_tile(const uint8_t* q, const float* xs, const int8_t* w, const int32_t* sums, const float* ws,
                       float* y, int64_t k_total, int64_t n_padded, int64_t m0, int64_t group) {
    const int64_t blocks = k_total / BLOCK;
    const int8_t* weights = w + group * 16 * k_total;
    const int32_t* offsets = sums + group * blocks * 16;
    __m512 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        const __m512i start = _mm512_loadu_si512(offsets + b * 16);
        __m512i dot[MT];
        for (int i = 0; i < MT; ++i) dot[i] = start;
        const int8_t* block = weights + b * BLOCK * 16;
        for (int t = 0; t < BLOCK / 4; ++t) {
            const __m512i wv = _mm512_loadu_si512(block + t * 64);
            for (int i = 0; i < MT; ++i) {
                int32_t four;
                std::memcpy(&four, q + (m0 + i) * k_total + b * BLOCK + t * 4, 4);
                dot[i] = _mm512_dpbusd_epi32(dot[i], _mm512_set1_epi32(four), wv);
            }
        }
        for (int i = 0; i < MT; ++i)
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_set1_ps(xs[(m0 + i) * blocks + b]), acc[i]);
    }
    const __m512 scale = _mm512_loadu_ps(ws + group * 16);
    for (int i = 0; i < MT; ++i) _mm512_storeu_ps(y + (m0 + i) * n_padded + group * 16, _mm512_mul_ps(acc[i], scale));
}

constexpr int TOKENS = 8;  // activation rows per tile: each weight load serves this many

// ---- AMX (Sapphire Rapids and later): many activation rows at once ----------------------------------
// With several rows VNNI is bound by its multiplies (each weight load feeds one instruction per row);
// one AMX instruction multiplies up to 16 rows by 16 weight rows over a whole block of 64 inputs.
// The packed weights are already in AMX's "B" layout: a block of 64 inputs of 16 weight rows is 16
// lines of 64 bytes (4 inputs of 16 rows each), contiguous. Each block's int32 sums go through memory
// to be scaled by the block's activation scale, in the same order as the VNNI path, so both paths give
// the same floats: a row's result does not depend on which path or which rows beside it.
constexpr int AMX_ROWS = 16;    // activation rows per tile
constexpr int AMX_GROUPS = 2;   // weight row groups per activation tile load
constexpr int64_t AMX_AHEAD = 2;  // blocks of weights fetched ahead
constexpr int64_t AMX_MIN_ROWS = 4;  // fewer rows: VNNI (measured: bench/RESULTS.md, int8 products)

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Tiles: 0 the activations, 1-2 the weights of two row groups, 3-4 their sums.
__attribute__((target("amx-tile"))) void configure_tiles(int rows) {
    TileConfig config;
    config.colsb[0] = 64; config.rows[0] = rows;
    for (int t = 1; t <= AMX_GROUPS; ++t) { config.colsb[t] = 64; config.rows[t] = 16; }
    for (int t = 1 + AMX_GROUPS; t <= 2 * AMX_GROUPS; ++t) { config.colsb[t] = 64; config.rows[t] = rows; }
    // GCC's ldtilecfg names 8 bytes of the config as its input: without this the other stores may go.
    asm volatile("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
}

// Whether this CPU and kernel let the process use AMX; it asks Linux for the AMX state once, before
// any thread uses it.
bool amx_supported() {
    static const bool supported = [] {
        if (!__builtin_cpu_supports("amx-int8") || !__builtin_cpu_supports("amx-tile")) return false;
        constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }();
    return supported;
}

std::atomic<bool> amx_wanted{true};  // LCKV_INT8_AMX=0 or use_amx(false): VNNI for every shape

bool amx_allowed() { return amx_wanted.load(std::memory_order_relaxed) && amx_supported(); }

// Turns the AMX path on or off (when supported); returns whether it is on now.
bool use_amx(bool on) {
    amx_wanted = on;
    return amx_allowed();
}

// Rows [m0, m0 + rows) against `count` (1 or 2) row groups from `group`; tiles configured for `rows`.
// Each sum tile starts from the block's offsets (-128 x the weights' sums: one line loaded into
// every row) and adds the block's products.
__attribute__((target("amx-tile,amx-int8,avx512f")))
void amx_tile(const uint8_t* q, const float* xs, const int8_t* w, const int32_t* sums, const float* ws,
              float* y, int64_t k_total, int64_t n_padded, int64_t m0, int rows, int64_t group, int count) {
    const int64_t blocks = k_total / BLOCK;
    alignas(64) int32_t dots[AMX_GROUPS][AMX_ROWS][16];
    __m512 acc[AMX_GROUPS][AMX_ROWS];
    for (int g = 0; g < AMX_GROUPS; ++g)
        for (int i = 0; i < AMX_ROWS; ++i) acc[g][i] = _mm512_setzero_ps();
    const int8_t* weights = w + group * 16 * k_total;
    const int32_t* offsets = sums + group * blocks * 16;
    for (int64_t b = 0; b < blocks; ++b) {
        // The weights stream from memory once per step: ask for blocks ahead while this one computes.
        if (b + AMX_AHEAD < blocks)
            for (int g = 0; g < count; ++g)
                for (int line = 0; line < BLOCK * 16; line += 64)
                    _mm_prefetch(reinterpret_cast<const char*>(weights + (g * k_total + (b + AMX_AHEAD) * BLOCK) * 16) + line, _MM_HINT_T0);
        _tile_loadd(0, q + m0 * k_total + b * BLOCK, k_total);
        _tile_loadd(3, offsets + b * 16, 0);
        _tile_loadd(1, weights + b * BLOCK * 16, 64);
        _tile_dpbusd(3, 0, 1);
        if (count == 2) {
            _tile_loadd(4, offsets + (blocks + b) * 16, 0);
            _tile_loadd(2, weights + (k_total + b * BLOCK) * 16, 64);
            _tile_dpbusd(4, 0, 2);
        }
        _tile_stored(3, dots[0], 64);
        if (count == 2) _tile_stored(4, dots[1], 64);
        for (int g = 0; g < count; ++g)
            for (int i = 0; i < rows; ++i)
                acc[g][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(dots[g][i])),
                                            _mm512_set1_ps(xs[(m0 + i) * blocks + b]), acc[g][i]);
    }
    for (int g = 0; g < count; ++g) {
        const __m512 scale = _mm512_loadu_ps(ws + (group + g) * 16);
        for (int i = 0; i < rows; ++i)
            _mm512_storeu_ps(y + (m0 + i) * n_padded + (group + g) * 16, _mm512_mul_ps(acc[g][i], scale));
    }
}

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

// x [M, K] (float32 or bfloat16), weight packed [N / 16, K / 4, 16, 4] int8 (N padded to 16),
// scale [N padded] float32, block_sums [N / 16, K / 64, 16] int32: y [M, out_features] in x's dtype.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& block_sums, int64_t out_features) {
    TORCH_CHECK(x.dim() == 2 && weight.dim() == 4 && weight.size(2) == 16 && weight.size(3) == 4
                && x.size(1) == weight.size(1) * 4, "int8_linear: shapes");
    TORCH_CHECK(x.size(1) % BLOCK == 0, "int8_linear: K must be a multiple of 64");
    TORCH_CHECK(weight.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat
                && block_sums.scalar_type() == at::kInt, "int8_linear: dtypes");
    const int64_t groups = weight.size(0), n_padded = groups * 16;
    TORCH_CHECK(scale.numel() == n_padded && block_sums.numel() == n_padded * (x.size(1) / BLOCK)
                && out_features <= n_padded, "int8_linear: scale and sums must match the packed weight");
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const at::Tensor w = weight.contiguous(), ws = scale.contiguous(), sums = block_sums.contiguous();
    const int64_t m_total = xf.size(0), k_total = xf.size(1), blocks = k_total / BLOCK;
    at::Tensor q = at::empty({m_total, k_total}, xf.options().dtype(at::kByte));
    at::Tensor xs = at::empty({m_total, blocks}, xf.options());
    quantize_rows(xf.data_ptr<float>(), m_total, k_total, q.data_ptr<uint8_t>(), xs.data_ptr<float>());
    at::Tensor y = at::empty({m_total, n_padded}, xf.options());
    const uint8_t* qp = q.data_ptr<uint8_t>();
    const float *xsp = xs.data_ptr<float>(), *wsp = ws.data_ptr<float>();
    const int32_t* sp = sums.data_ptr<int32_t>();
    const int8_t* wp = w.data_ptr<int8_t>();
    float* yp = y.data_ptr<float>();
    // The threads take chunks of row groups as they come free, not a fixed share each: when the
    // machine is busy (the web server on the same two cores), a thread the OS set aside holds up
    // only its own chunk, not half of the product.
    const int64_t chunk = std::max<int64_t>(1, groups / (8 * at::get_num_threads()));
    std::atomic<int64_t> next{0};
    if (m_total >= AMX_MIN_ROWS && amx_allowed()) {
        const int64_t pairs = (groups + AMX_GROUPS - 1) / AMX_GROUPS;
        const int64_t pair_chunk = std::max<int64_t>(1, pairs / (8 * at::get_num_threads()));
        at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
            int configured = 0;  // tile rows the config holds (per thread)
            for (int64_t first = next.fetch_add(pair_chunk); first < pairs; first = next.fetch_add(pair_chunk))
            for (int64_t pair = first; pair < std::min(first + pair_chunk, pairs); ++pair) {
                const int64_t group = pair * AMX_GROUPS;
                const int count = static_cast<int>(std::min<int64_t>(AMX_GROUPS, groups - group));
                for (int64_t m0 = 0; m0 < m_total; m0 += AMX_ROWS) {
                    const int rows = static_cast<int>(std::min<int64_t>(AMX_ROWS, m_total - m0));
                    if (rows != configured) { configure_tiles(rows); configured = rows; }
                    amx_tile(qp, xsp, wp, sp, wsp, yp, k_total, n_padded, m0, rows, group, count);
                }
            }
            if (configured) release_tiles();
        });
        at::Tensor out = out_features == n_padded ? y : y.narrow(1, 0, out_features).contiguous();
        return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
    }
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
        for (int64_t first = next.fetch_add(chunk); first < groups; first = next.fetch_add(chunk))
        for (int64_t group = first; group < std::min(first + chunk, groups); ++group) {
            for (int64_t m0 = 0; m0 < m_total; m0 += TOKENS) {
                switch (std::min<int64_t>(TOKENS, m_total - m0)) {
                    case 8: group_tile<8>(qp, xsp, wp, sp, wsp, yp, k_total, n_padded, m0, group); break;
                    case 7: group_tile<7>(qp, xsp, wp, sp, wsp, yp, k_total, n_padded, m0, group); break;
                    case 6: group_tile<6>(qp, xsp, wp, sp, wsp, yp, k_total, n_padded, m0, group); break;
                    case 5: group_tile<5>(qp, xsp, wp, sp, wsp, yp, k_total, n_padded, m0, group); break;
                    case 4: group_tile<4>(qp, xsp, wp, sp, wsp, yp, k_total, n_padded, m0, group); break;
                    case 3: group_tile<3>(qp, xsp, wp, sp, wsp, yp, k_total, n_padded, m0, group); break;
                    case 2: group_tile<2>(qp, xsp, wp, sp, wsp, yp, k_total, n_padded, m0, group); break;
                    default: group_tile<1>(qp, xsp, wp, sp, wsp, yp, k_total, n_padded, m0, group); break;
                }
            }
        }
    });
    at::Tensor out = out_features == n_padded ? y : y.narrow(1, 0, out_features).contiguous();
    return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(lckv, m) {
    m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor block_sums, int out_features) -> Tensor");
    m.def("int8_use_amx(bool on) -> bool", &use_amx);
}

TORCH_LIBRARY_IMPL(lckv, CPU, m) { m.impl("int8_linear", &int8_linear); }
