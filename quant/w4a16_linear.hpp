// Weight-only linear layers with packed 2..4-bit weights (W4A16): the input stays bf16, the
// weights stay packed in memory, two codes per byte (the packed checkpoint's layout, see
// quant/packed_checkpoint.hpp: column 2i in the low nibble, 2i+1 in the high one, 4-bit two's
// complement) with one step and offset per group, and the GEMM dequantizes them on the chip:
//     w[o, k]   = bf16((code[o, k] + offset[g]) * step[g]),   g = group of (o, k)
//     out[n, o] = bf16(sum_k in[n, k] * w[o, k] + bias[o])     (fp32 sums, fp32 bias)
// w is the fake-quant path's weight bit for bit (the same quant_value, rounded to bf16 the same
// way), so the layer equals the fake-quant bf16 product up to the order of the fp32 sums (and
// the bias, bf16 there). Every
// grid (symmetric, asymmetric, centered) and granularity (tensor, row, group) is executable:
// the offset carries the zero point or QuEST's half step. Memory per weight: 4 bits plus 8 bytes
// per group, against 16 bits in bf16 — what makes small-batch decoding up to ~4x faster.
// CPU reference here; CUDA kernels in quant/w4a16_linear.cu; tests in tests/test_w4a16_linear.cpp.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/gpu.hpp"
#include "quant/quantizer.hpp"

namespace qopt {

// The weight formats this path executes: 2..4 bits, any grid, per tensor / row / group of a
// multiple of 16 columns. Throws qopt::Error naming what is not.
void check_weight_only_spec(const QuantSpec& spec);

// Packed weights [rows, cols] on the host; groups of group_cols columns (per row: cols).
struct PackedWeights {
    int rows = 0, cols = 0, group_cols = 0;
    std::vector<uint8_t> packed;        // [rows, cols / 2]
    std::vector<float> steps, offsets;  // [rows, cols / group_cols]
    int groups_per_row() const { return cols / group_cols; }
};
// From quantized codes (a per-tensor grid is repeated for every row). cols must be a multiple
// of 32 (the GEMM's k tile); refused by name otherwise.
PackedWeights pack_weights(const QuantizedTensor& q);
// The dequantized weights as the GEMM sees them (bf16 values, as floats) [rows, cols].
std::vector<float> dequantized_weights(const PackedWeights& w);

// CPU reference: out [n_rows, rows] = in [n_rows, cols] * w^T + bias (bias may be null), sums in
// float64 over the bf16-rounded weights; out is not rounded to bf16.
void w4a16_linear_cpu(float* out, const float* in, const PackedWeights& w, const float* bias, int n_rows);

// ---- GPU
// Packed weights on the device (the same layout).
struct DevicePackedWeights {
    int rows = 0, cols = 0, group_cols = 0;
    DeviceBuffer<uint8_t> packed;
    DeviceBuffer<float> steps, offsets;
    void upload(const PackedWeights& w);
};
// The layer. Up to 16 input rows (decoding) take a GEMV kernel that streams the packed weights
// (passes of 4 rows); more take the tensor-core GEMM (128 x 128 tiles, dequantized in shared
// memory). The input must be 16-byte aligned (refused otherwise).
void w4a16_linear_forward_gpu(bf16* out, const bf16* in, const DevicePackedWeights& w, const float* bias, int n_rows,
                              cudaStream_t stream = 0);

}  // namespace qopt
