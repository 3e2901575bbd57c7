// CUDA side of quant/int8_linear.hpp: per-token quantization of bf16 rows to int8 codes or, for
// grids of up to 5 bits, to the same integers as e4m3 bytes (one warp per row: statistics by warp
// reductions, then the codes), and the scale step after the int32 product. Both are memory-bound
// passes; the products are quant/int8_scaled_gemm.cu's (scales in its epilogue) or kernels/matmul.cu's
// int8_matmul_gpu (then the scale pass) and fp8_scaled_matmul_gpu (whose epilogue applies the scales).
#include <type_traits>

#include "core/error.hpp"
#include "kernels/cuda_common.cuh"
#include "quant/int8_linear.hpp"
#include "quant/quant_gpu.hpp"

namespace qopt {

namespace {

constexpr int kWarpsPerBlock = 8;

// Row r of x: absmax and sum of squares (the statistics absmax, clip and gaussian need), then
// codes = quant_code(grid, x). Lanes read 8 bf16 (16 bytes) at a time when the row allows.
// Code = int8_t, or uint8_t for the e4m3 encoding of the same integer.
template <typename Code, bool fp8 = std::is_unsigned_v<Code>>
__global__ void quantize_rows_kernel(Code* codes, float* steps, const bf16* x, long rows, int cols, QuantSpec spec,
                                     float alpha, bool vector_loads) {
    const long row = long(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const bf16* in = x + row * cols;
    Code* out = codes + row * cols;
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
    const bool doubled = spec.grid == QuantGrid::Centered;
    if (lane == 0) steps[row] = integer_step(g.step, doubled);
    visit([&](int i, float v) { out[i] = Code(integer_code_byte(integer_code(quant_code(g, v), doubled), fp8)); });
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

namespace {

template <typename Code>
void quantize_rows(Code* codes, float* steps, const bf16* x, long rows, int cols, const QuantSpec& spec,
                   cudaStream_t stream) {
    check_integer_spec(spec, true);
    if (rows <= 0) return;
    const bool vector_loads = cols % 8 == 0 && is_aligned(x, 16);
    const unsigned blocks = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    quantize_rows_kernel<Code><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(codes, steps, x, rows, cols, spec,
                                                                           rule_alpha(spec), vector_loads);
    CUDA_CHECK_LAUNCH();
}

}  // namespace

void quantize_rows_int8_gpu(int8_t* codes, float* steps, const bf16* x, long rows, int cols, const QuantSpec& spec,
                            cudaStream_t stream) {
    quantize_rows(codes, steps, x, rows, cols, spec, stream);
}

void quantize_rows_fp8_gpu(uint8_t* codes, float* steps, const bf16* x, long rows, int cols, const QuantSpec& spec,
                           cudaStream_t stream) {
    check_fp8_spec(spec);
    quantize_rows(codes, steps, x, rows, cols, spec, stream);
}

void dequantize_product_gpu(bf16* out, const int32_t* product, const float* in_steps, const float* w_steps,
                            const float* bias, long n_rows, int out_dim, cudaStream_t stream) {
    dequantize_product_kernel<<<grid_for(size_t(n_rows) * out_dim), 256, 0, stream>>>(out, product, in_steps, w_steps,
                                                                                      bias, n_rows, out_dim);
    CUDA_CHECK_LAUNCH();
}

namespace {

// The input's integer codes and steps, rotated first with a Hadamard block: one fused pass where
// the quantizer's register path applies, else the rotation (out of place) and the per-row kernel.
template <typename Code>
void quantize_input(Code* codes, const bf16* in, long rows, int cols, int hadamard_block, const QuantSpec& spec,
                    Int8LinearScratch& scratch, cudaStream_t stream) {
    constexpr bool fp8 = std::is_unsigned_v<Code>;  // uint8_t: e4m3 bytes
    check_integer_spec(spec, true);
    if (scratch.steps.size() < size_t(rows)) scratch.steps.resize(size_t(rows));
    if (rotate_quantize_codes_gpu(codes, fp8, scratch.steps.data(), in, rows, cols, hadamard_block, spec, stream))
        return;
    const bf16* x = in;
    if (hadamard_block > 1) {
        if (scratch.rotated.size() < size_t(rows) * cols) scratch.rotated.resize(size_t(rows) * cols);
        masked_hadamard_rows_gpu(scratch.rotated.data(), in, nullptr, rows, cols, hadamard_block, false, stream);
        x = scratch.rotated.data();
    }
    quantize_rows(codes, scratch.steps.data(), x, rows, cols, spec, stream);
}

}  // namespace

void int8_linear_forward_gpu(bf16* out, const bf16* in, const int8_t* weight_codes, const float* weight_steps,
                             const float* bias, int n_rows, int in_dim, int out_dim, const QuantSpec& input_spec,
                             int hadamard_block, Int8LinearScratch& scratch, cudaStream_t stream) {
    QOPT_CHECK(in_dim < 133000, "integer execution: in_dim ", in_dim, " could overflow the int32 product");
    const size_t codes = size_t(n_rows) * in_dim, products = size_t(n_rows) * out_dim;
    if (scratch.codes.size() < codes) scratch.codes.resize(codes);
    quantize_input(scratch.codes.data(), in, n_rows, in_dim, hadamard_block, input_spec, scratch, stream);
    if (int8_scaled_matmul_gpu(out, scratch.codes.data(), weight_codes, scratch.steps.data(), weight_steps, bias,
                               n_rows, in_dim, out_dim, stream))
        return;
    if (scratch.product.size() < products) scratch.product.resize(products);
    int8_matmul_gpu(scratch.product.data(), scratch.codes.data(), weight_codes, n_rows, in_dim, out_dim, stream);
    dequantize_product_gpu(out, scratch.product.data(), scratch.steps.data(), weight_steps, bias, n_rows, out_dim,
                           stream);
}

void fp8_linear_forward_gpu(bf16* out, const bf16* in, const uint8_t* weight_codes, const float* weight_steps,
                            const bf16* bias, int n_rows, int in_dim, int out_dim, const QuantSpec& input_spec,
                            int hadamard_block, Int8LinearScratch& scratch, cudaStream_t stream) {
    QOPT_CHECK(in_dim < 74000, "fp8 integer execution: in_dim ", in_dim, " could leave the exact fp32 sums");
    check_fp8_spec(input_spec);
    const size_t codes = size_t(n_rows) * in_dim;
    if (scratch.fp8_codes.size() < codes) scratch.fp8_codes.resize(codes);
    quantize_input(scratch.fp8_codes.data(), in, n_rows, in_dim, hadamard_block, input_spec, scratch, stream);
    fp8_scaled_matmul_gpu(out, false, scratch.fp8_codes.data(), weight_codes, scratch.steps.data(), weight_steps, bias,
                          n_rows, in_dim, out_dim, stream);
}

}  // namespace qopt
