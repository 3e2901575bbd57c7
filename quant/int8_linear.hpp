// Linear layers executed in integers (W8A8, and any WbAb with b <= 8 on the same int8 tensor
// cores; up to 5 bits on fp8 tensor cores): activations quantized per token to integer codes with
// one fp32 step per row, weights stored as integer codes with one step per output channel
// (value = code * step; QuEST's centered grid as doubled codes, see integer_code),
// the product in int32 (quant/int8_scaled_gemm.cu with the scales in its epilogue, or cuBLASLt
// (kernels/matmul.cu) and the scales applied afterwards):
//     out[n, o] = (sum_i xq[n, i] * wq[o, i]) * x_step[n] * w_step[o] + bias[o]
// The integer sum is exact (|sum| <= in_dim * 127^2 < 2^31 for in_dim < 133,000), so this equals
// the fake-quant product Q(x) Q(w)^T of the same codes up to the rounding of the final
// multiplications — where the fake-quant path (bf16 operands) also rounds every dequantized
// operand. CPU references here; CUDA kernels in quant/int8_linear.cu; tests in
// tests/test_int8_linear.cpp.
#pragma once
#include <cuda_fp8.h>

#include <cstdint>

#include <vector>

#include "kernels/gpu.hpp"
#include "quant/quantizer.hpp"

namespace qopt {

// The specs the integer path executes: 2..8 bits on the symmetric grid (value = code * step), or
// 2..7 bits on QuEST's centered grid (value = (code + 1/2) * step), one scale per row (token /
// output channel). Activations are quantized at run time by absmax, clip or gaussian (the mse
// search is not offered there). Throws qopt::Error naming what is not.
void check_integer_spec(const QuantSpec& spec, bool activations);

// The integer the tensor cores multiply for a grid code, and its step: the code itself on the
// symmetric grid; on the centered grid the doubled value 2 code + 1 (odd, |.| <= 2^b - 1) with
// half the step, so integer * step is the same product (code + 1/2) * step, bit for bit.
QOPT_HD inline int integer_code(int code, bool doubled) { return doubled ? 2 * code + 1 : code; }
QOPT_HD inline float integer_step(float step, bool doubled) { return doubled ? 0.5f * step : step; }
// The byte an integer code is stored as: int8 two's complement, or with fp8 its e4m3 encoding
// (exact for |code| <= 16).
QOPT_HD inline uint8_t integer_code_byte(int code, bool fp8) {
    return fp8 ? uint8_t(__nv_cvt_float_to_fp8(float(code), __NV_SATFINITE, __NV_E4M3)) : uint8_t(int8_t(code));
}

// Codes [rows, cols] and steps [rows] of x by the spec's per-row grids (= quantize_cpu).
void quantize_rows_int8_cpu(int8_t* codes, float* steps, const float* x, int rows, int cols, const QuantSpec& spec);

// The scale step: out[n, o] = mul(mul(float(product[n, o]), in_steps[n]), w_steps[o]) + bias[o]
// (bias may be null), each operation rounded on its own, as on the GPU.
void dequantize_product_cpu(float* out, const int32_t* product, const float* in_steps, const float* w_steps,
                            const float* bias, int n_rows, int out_dim);

// A weight matrix ready for the int8 product: codes [rows, cols] and one step per row, from a
// per-row symmetric quantized tensor (checked: check_integer_spec).
struct IntegerMatrix {
    std::vector<int8_t> codes;
    std::vector<float> steps;
};
IntegerMatrix integer_matrix(QuantizedTensor q);

// Grids whose integer codes are exact in e4m3 (|code| <= 15: symmetric up to 5 bits, centered up
// to 4), which can run on fp8 tensor cores with the scales in the GEMM's epilogue
// (fp8_linear_forward_gpu).
bool fp8_exact(const QuantSpec& spec);
// Throws qopt::Error naming the spec where it is not fp8_exact.
void check_fp8_spec(const QuantSpec& spec);
// The e4m3 byte of each code (|code| <= 16, exact; throws qopt::Error for larger ones).
std::vector<uint8_t> fp8_codes(const std::vector<int8_t>& codes);

// ---- GPU
void quantize_rows_int8_gpu(int8_t* codes, float* steps, const bf16* x, long rows, int cols, const QuantSpec& spec,
                            cudaStream_t stream = 0);
void dequantize_product_gpu(bf16* out, const int32_t* product, const float* in_steps, const float* w_steps,
                            const float* bias, long n_rows, int out_dim, cudaStream_t stream = 0);

// The same codes as e4m3 bytes (the spec must be fp8_exact).
void quantize_rows_fp8_gpu(uint8_t* codes, float* steps, const bf16* x, long rows, int cols, const QuantSpec& spec,
                           cudaStream_t stream = 0);

// The int8 product and the scale step in one kernel (quant/int8_scaled_gemm.cu, Hopper's int8
// tensor cores): out = bf16 of dequantize_product_cpu's value of the exact int32 sums, bit for bit
// the int8_matmul_gpu + dequantize_product_gpu pair, without the int32 product in memory. Any
// n_rows and out_dim; in_dim a multiple of 16 and 16-byte aligned codes. Returns false (nothing
// launched) where it does not apply: a build without sm_90a, a GPU other than sm_90, or in_dim
// and alignment as said.
bool int8_scaled_matmul_available(int in_dim);
bool int8_scaled_matmul_gpu(bf16* out, const int8_t* in, const int8_t* weight, const float* in_steps,
                            const float* w_steps, const float* bias, int n_rows, int in_dim, int out_dim,
                            cudaStream_t stream = 0);

// Scratch of one integer layer (grown on demand): the input's codes and steps, the int32 product.
struct Int8LinearScratch {
    DeviceBuffer<int8_t> codes;
    DeviceBuffer<uint8_t> fp8_codes;
    DeviceBuffer<float> steps;
    DeviceBuffer<int32_t> product;
    DeviceBuffer<bf16> rotated;  // the rotated input, where the rotation cannot be fused
};
// The whole layer: rotate (hadamard_block > 1) and quantize the input rows — one pass where
// rotate_quantize_codes_gpu's register path applies —, then the int8 product with the scales
// (+ bias) in its epilogue (int8_scaled_matmul_gpu) where that applies, else the int32 product
// (cuBLASLt) and the scale pass; n_rows, in_dim and out_dim must then be multiples of 4 (the
// int8 product's layout; refused otherwise).
void int8_linear_forward_gpu(bf16* out, const bf16* in, const int8_t* weight_codes, const float* weight_steps,
                             const float* bias, int n_rows, int in_dim, int out_dim, const QuantSpec& input_spec,
                             int hadamard_block, Int8LinearScratch& scratch, cudaStream_t stream = 0);

// The layer on fp8 tensor cores for fp8_exact specs (W4A4, W5A5, W4A8 is not: 8-bit codes are
// not exact in e4m3): rotate and quantize the input rows to e4m3 codes (as above), then one GEMM
// whose epilogue applies both steps and the (bf16) bias — no int32 product in memory, no scale
// pass. Equals
// int8_linear_forward_gpu on the same codes up to the rounding of the scale multiplications and
// the bias's bf16 rounding. Sizes multiples of 16 (refused otherwise).
void fp8_linear_forward_gpu(bf16* out, const bf16* in, const uint8_t* weight_codes, const float* weight_steps,
                            const bf16* bias, int n_rows, int in_dim, int out_dim, const QuantSpec& input_spec,
                            int hadamard_block, Int8LinearScratch& scratch, cudaStream_t stream = 0);

}  // namespace qopt
