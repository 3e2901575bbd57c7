// Real integer execution of a quantized model's hidden linear layers: which kernels run a
// configuration, and the quantized weights they take.
//   activations quantized (W8A8 style)  int8 x int8 -> int32 products (quant/int8_linear.hpp):
//                                       symmetric per-channel weights and per-token activations;
//                                       both at most 5 bits (W4A4): the same codes on fp8 tensor
//                                       cores, scales in the GEMM's epilogue
//   weight-only, 2..4-bit weights       packed-weight GEMM, bf16 inputs (quant/w4a16_linear.hpp):
//                                       any grid, per tensor / row / group
#pragma once
#include <vector>

#include "model/config.hpp"
#include "quant/linear_quant.hpp"
#include "quant/quantizer.hpp"

namespace qopt {

enum class IntegerPath { Int8Product, PackedWeights };

// The path that executes `quant`; throws qopt::Error naming what neither executes.
IntegerPath integer_path(const LinearQuantConfig& quant);
// What runs `quant` in words: "int8 tensor cores", "fp8 tensor cores, ..." or "packed 4-bit weights, ...".
const char* integer_execution_name(const LinearQuantConfig& quant);

// Every hidden matrix of the model (linear_matrices order) quantized for integer execution under
// `quant`: a quantized file's stored codes and grids when `stored` is given (one per matrix), else
// the weights rotated as `quant` says and quantized by its weight spec (RTN, as ptq's RTN).
std::vector<QuantizedTensor> integer_matrices(const ModelConfig& config, const std::vector<float>& params,
                                              const LinearQuantConfig& quant,
                                              const std::vector<QuantizedTensor>* stored = nullptr);

}  // namespace qopt
