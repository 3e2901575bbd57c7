// Host-side API of the quantization kernels (quant/quant_kernels.cu). CPU references:
// quant/hadamard.hpp (hadamard_rows_cpu) and quant/quantizer.hpp (fake_quant_cpu).
// Rows are contiguous ([rows, cols] row-major); cols <= 32768.
//
// The estimator's mask ("keep": does the gradient pass this element?) is one bit per element,
// laid out for the register path: the tensor's elements in row-major order e are cut into
// chunks of 128; chunk c owns words 4c .. 4c+3, element e = 128 c + 4 l + i sits in word 4c + i,
// bit l (the l-th lane's i-th element; the kernels build each word with one warp ballot).
#pragma once
#include <cstdint>

#include "kernels/gpu.hpp"
#include "quant/quantizer.hpp"

namespace qopt {

inline size_t keep_mask_words(size_t elements) { return (elements + 127) / 128 * 4; }
QOPT_HD inline bool keep_mask_bit(const uint32_t* words, size_t e) {
    return (words[(e >> 7) * 4 + (e & 3)] >> ((e & 127) >> 2)) & 1u;
}

// In place: every row rotated block-diagonally by H_block (block a power of two dividing cols).
void hadamard_rows_gpu(float* data, long rows, int cols, int block, cudaStream_t stream = 0);
void hadamard_rows_gpu(bf16* data, long rows, int cols, int block, cudaStream_t stream = 0);

// out = fake_quant(rotate(in)) with the estimator's mask keep (may be null): the forward half of
// a quantized linear layer's input or weight. hadamard_block 0: no rotation. trust as in
// fake_quant_cpu (< 0: STE). Per-tensor granularity uses `scratch` (rows * 4 doubles, may be
// null otherwise) and does not support the mse rule. out may equal in (bf16).
void rotate_fake_quant_rows_gpu(bf16* out, uint32_t* keep, const bf16* in, long rows, int cols, int hadamard_block,
                                const QuantSpec& spec, float trust, double* scratch = nullptr,
                                cudaStream_t stream = 0);
void rotate_fake_quant_rows_gpu(bf16* out, uint32_t* keep, const float* in, long rows, int cols, int hadamard_block,
                                const QuantSpec& spec, float trust, double* scratch = nullptr,
                                cudaStream_t stream = 0);

// Rotation and per-row quantization into integer codes in one pass (the register path of
// rotate_fake_quant_rows_gpu: rows a multiple of 128, block <= 128, one scale per row, not mse):
// codes [rows, cols] as int8, or with fp8 as e4m3 bytes of the same integers, the centered grid
// as doubled codes with half steps (quant/int8_linear.hpp: integer_code, integer_step), one
// step per row. Integer code * step is rotate_fake_quant_rows_gpu's value bit for bit (the same
// kernel, grids and rotation in fp32); rotating to bf16 first and then quantizing, the two-pass
// fallback, can move codes that sit on a rounding boundary. Returns false, doing nothing, where
// the register path does not apply (the caller takes the two passes).
bool rotate_quantize_codes_gpu(void* codes, bool fp8, float* steps, const bf16* in, long rows, int cols,
                               int hadamard_block, const QuantSpec& spec, cudaStream_t stream = 0);

// The backward half: out = rotate(grad * keep) (keep may be null: all pass), written or, with
// accumulate, added. H is symmetric, so the gradient of x -> x H is g -> g H.
void masked_hadamard_rows_gpu(bf16* out, const bf16* grad, const uint32_t* keep, long rows, int cols,
                              int hadamard_block, bool accumulate, cudaStream_t stream = 0);
void masked_hadamard_rows_gpu(float* out, const float* grad, const uint32_t* keep, long rows, int cols,
                              int hadamard_block, bool accumulate, cudaStream_t stream = 0);

// A layer whose input is act(pre_activation) (the MLP's down projection), the activation in the
// same pass as the rotation, so act(pre_activation) is never written:
//  forward:  out = fake_quant(rotate(act(pre_activation))), act rounded to bf16 first exactly as
//            activation_forward_gpu rounds it (bit-identical to those two passes);
//  backward: out = act'(pre_activation) * ((grad * keep) H) (written, not accumulated).
void activation_fake_quant_rows_gpu(bf16* out, uint32_t* keep, const bf16* pre_activation, MlpActivation activation,
                                    long rows, int cols, int hadamard_block, const QuantSpec& spec, float trust,
                                    double* scratch = nullptr, cudaStream_t stream = 0);
void masked_hadamard_activation_rows_gpu(bf16* out, const bf16* grad, const uint32_t* keep, const bf16* pre_activation,
                                         MlpActivation activation, long rows, int cols, int hadamard_block,
                                         cudaStream_t stream = 0);

}  // namespace qopt
