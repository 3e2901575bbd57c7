// GPTQ (Frantar et al., 2022): quantize a weight [rows = out, cols = in] column by column,
// pushing each column's rounding error onto the columns not yet quantized so that the layer's
// output error ||X (W - Q)^T||^2 over calibration inputs X is small. With the Hessian
// H = X^T X (+ damping), let U be the upper Cholesky factor of H^-1 (H^-1 = U^T U). Column j:
//     q_j = quant(w_j),   e = (w_j - q_j) / U[j][j],   w_k -= e U[j][k]  for k > j
// Rows are independent given U, so the CPU processes tiles of rows in parallel, streaming U
// once per tile (the role the GPU reference's lazy block updates play for memory traffic).
// Options as the reference: damping as a fraction of mean(diag H), activation order (columns
// by descending diag H), dead inputs (diag H = 0) zeroed.
#pragma once
#include <vector>

#include "quant/quantizer.hpp"

namespace qopt {

struct GptqOptions {
    double damp = 0.01;      // added to diag H: damp * mean(diag H)
    bool act_order = false;  // quantize columns in order of descending diag H
};

// H (n x n, row-major, symmetric positive definite) -> U upper with U^T U = H^-1. Throws when H
// is not positive definite.
std::vector<double> upper_cholesky_of_inverse(const std::vector<double>& hessian, int n);

// What both implementations start from: the checks, dead inputs (their weights zeroed, their
// diagonal set to 1), the damping, the processing order and the Hessian permuted into it, and
// the result with its per-row / per-tensor grids chosen from the (dead-zeroed) weights.
struct GptqProblem {
    std::vector<float> weight;    // [rows, cols], columns in their own order, dead inputs zeroed
    std::vector<int> order;       // order[a]: the column quantized a-th
    std::vector<double> hessian;  // damped, rows and columns in processing order
    QuantizedTensor result;       // codes sized; grids chosen (per group: sized, chosen on the way)
};
GptqProblem prepare_gptq(const float* weight, int rows, int cols, const std::vector<double>& hessian,
                         const QuantSpec& spec, const GptqOptions& options);

// weight [rows, cols] in the basis the Hessian [cols, cols] was collected in. Grids per the
// spec (per-group grids are chosen from the already-updated columns when their group starts;
// activation order with groups is refused). CPU reference, float64.
QuantizedTensor gptq_quantize(const float* weight, int rows, int cols, const std::vector<double>& hessian,
                              const QuantSpec& spec, const GptqOptions& options);

// The same on the GPU (quant/gptq_gpu.cu): U from cuSOLVER in float64, then the columns in
// blocks of at most 128 — inside a block one thread per row quantizes column by column and
// pushes the error onto the block's later columns (the CPU's update, restricted to the block);
// the block's errors reach all later columns at once as one fp32 GEMM (the reference's lazy
// batch update). fp32 rounding lets a code near a rounding boundary differ from the CPU's.
QuantizedTensor gptq_quantize_gpu(const float* weight, int rows, int cols, const std::vector<double>& hessian,
                                  const QuantSpec& spec, const GptqOptions& options);

}  // namespace qopt
