// Host-side API of the quantization kernels (quant/quant_kernels.cu). CPU references:
// quant/hadamard.hpp (hadamard_rows_cpu) and quant/quantizer.hpp (fake_quant_cpu).
// Rows are contiguous ([rows, cols] row-major); cols <= 32768.
#pragma once
#include <cstdint>

#include "kernels/gpu.hpp"
#include "quant/quantizer.hpp"

namespace qopt {

// In place: every row rotated block-diagonally by H_block (block a power of two dividing cols).
void hadamard_rows_gpu(float* data, long rows, int cols, int block, cudaStream_t stream = 0);
void hadamard_rows_gpu(bf16* data, long rows, int cols, int block, cudaStream_t stream = 0);

// out = fake_quant(rotate(in)) with the estimator's mask keep (may be null): the forward half of
// a quantized linear layer's input or weight. hadamard_block 0: no rotation. trust as in
// fake_quant_cpu (< 0: STE). Per-tensor granularity uses `scratch` (rows * 4 doubles, may be
// null otherwise) and does not support the mse rule. out may equal in (bf16).
void rotate_fake_quant_rows_gpu(bf16* out, uint8_t* keep, const bf16* in, long rows, int cols, int hadamard_block,
                                const QuantSpec& spec, float trust, double* scratch = nullptr,
                                cudaStream_t stream = 0);
void rotate_fake_quant_rows_gpu(bf16* out, uint8_t* keep, const float* in, long rows, int cols, int hadamard_block,
                                const QuantSpec& spec, float trust, double* scratch = nullptr,
                                cudaStream_t stream = 0);

// The backward half: out = rotate(grad * keep) (keep may be null: all pass), written or, with
// accumulate, added. H is symmetric, so the gradient of x -> x H is g -> g H.
void masked_hadamard_rows_gpu(bf16* out, const bf16* grad, const uint8_t* keep, long rows, int cols,
                              int hadamard_block, bool accumulate, cudaStream_t stream = 0);
void masked_hadamard_rows_gpu(float* out, const float* grad, const uint8_t* keep, long rows, int cols,
                              int hadamard_block, bool accumulate, cudaStream_t stream = 0);

// The same for a layer whose input was act(pre_activation) (the MLP's down projection):
//   out = act'(pre_activation) * ((grad * keep) H)
// in one pass (written, not accumulated), so the activation's backward needs no pass of its own.
enum class ActivationGrad { Gelu, Relu2 };
void masked_hadamard_activation_rows_gpu(bf16* out, const bf16* grad, const uint8_t* keep, const bf16* pre_activation,
                                         ActivationGrad activation, long rows, int cols, int hadamard_block,
                                         cudaStream_t stream = 0);

}  // namespace qopt
