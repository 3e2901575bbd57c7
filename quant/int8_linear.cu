// CUDA side of quant/int8_linear.hpp: per-token quantization of bf16 rows to int8 codes (one warp
// per row: statistics by warp reductions, then the codes), and the scale step after the int32
// product. Both are memory-bound passes; the product is kernels/matmul.cu's int8_matmul_gpu.
#include "core/error.hpp"
#include "kernels/cuda_common.cuh"
#include "quant/int8_linear.hpp"

namespace qopt {

namespace {

constexpr int kWarpsPerBlock = 8;

// Row r of x: absmax and sum of squares (the statistics absmax, clip and gaussian need), then
// codes = quant_code(grid, x). Lanes read 8 bf16 (16 bytes) at a time when the row allows.
__global__ void quantize_rows_int8_kernel(int8_t* codes, float* steps, const bf16* x, long rows, int cols,
                                          QuantSpec spec, float alpha, bool vector_loads) {
    const long row = long(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const bf16* in = x + row * cols;
    int8_t* out = codes + row * cols;
    float absmax = 0;
    double sum_squares = 0;
    auto visit = [&](auto&& use) {
        if (vector_loads) {
            for (int i = lane * 8; i < cols; i += 32 * 8) {
                const uint4 packed = *reinterpret_cast<const uint4*>(in + i);
                const bf16* v = reinterpret_cast<const bf16*>(&packed);
#pragma unroll
                for (int k = 0; k < 8; ++k) use(i + k, __bfloat162float(v[k]));
            }
        } else {
            for (int i = lane; i < cols; i += 32) use(i, __bfloat162float(in[i]));
        }
    };
    visit([&](int, float v) {
        absmax = fmaxf(absmax, fabsf(v));
        sum_squares += double(v) * double(v);
    });
    for (int offset = 16; offset > 0; offset /= 2) {
        absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, offset));
        sum_squares += __shfl_xor_sync(0xffffffffu, sum_squares, offset);
    }
    const GroupStats stats{absmax, -absmax, absmax, sum_squares};
    const GroupGrid g = grid_from_stats(spec.grid, spec.bits, spec.rule, spec.clip_ratio, alpha, stats, cols);
    if (lane == 0) steps[row] = g.step;
    visit([&](int i, float v) { out[i] = int8_t(quant_code(g, v)); });
}

__global__ void dequantize_product_kernel(bf16* out, const int32_t* product, const float* in_steps,
                                          const float* w_steps, const float* bias, long n_rows, int out_dim) {
    const size_t total = size_t(n_rows) * out_dim;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        const long n = long(i / out_dim);
        const int o = int(i % out_dim);
        const float scaled = __fmul_rn(__fmul_rn(__int2float_rn(product[i]), in_steps[n]), w_steps[o]);
        out[i] = __float2bfloat16_rn(bias ? __fadd_rn(scaled, bias[o]) : scaled);
    }
}

}  // namespace

void quantize_rows_int8_gpu(int8_t* codes, float* steps, const bf16* x, long rows, int cols, const QuantSpec& spec,
                            cudaStream_t stream) {
    check_integer_spec(spec, true);
    if (rows <= 0) return;
    const bool vector_loads = cols % 8 == 0 && is_aligned(x, 16);
    const unsigned blocks = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    quantize_rows_int8_kernel<<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(codes, steps, x, rows, cols, spec,
                                                                          rule_alpha(spec), vector_loads);
    CUDA_CHECK_LAUNCH();
}

void dequantize_product_gpu(bf16* out, const int32_t* product, const float* in_steps, const float* w_steps,
                            const float* bias, long n_rows, int out_dim, cudaStream_t stream) {
    dequantize_product_kernel<<<grid_for(size_t(n_rows) * out_dim), 256, 0, stream>>>(out, product, in_steps, w_steps,
                                                                                      bias, n_rows, out_dim);
    CUDA_CHECK_LAUNCH();
}

void int8_linear_forward_gpu(bf16* out, const bf16* in, const int8_t* weight_codes, const float* weight_steps,
                             const float* bias, int n_rows, int in_dim, int out_dim, const QuantSpec& input_spec,
                             Int8LinearScratch& scratch, cudaStream_t stream) {
    QOPT_CHECK(in_dim < 133000, "integer execution: in_dim ", in_dim, " could overflow the int32 product");
    const size_t codes = size_t(n_rows) * in_dim, products = size_t(n_rows) * out_dim;
    if (scratch.codes.size() < codes) scratch.codes.resize(codes);
    if (scratch.steps.size() < size_t(n_rows)) scratch.steps.resize(size_t(n_rows));
    if (scratch.product.size() < products) scratch.product.resize(products);
    quantize_rows_int8_gpu(scratch.codes.data(), scratch.steps.data(), in, n_rows, in_dim, input_spec, stream);
    int8_matmul_gpu(scratch.product.data(), scratch.codes.data(), weight_codes, n_rows, in_dim, out_dim, stream);
    dequantize_product_gpu(out, scratch.product.data(), scratch.steps.data(), weight_steps, bias, n_rows, out_dim,
                           stream);
}

}  // namespace qopt
