// The quantized checkpoint `ptq --out` writes: one safetensors file that common tools load.
//   metadata  qopt_config  the model config (JSON, as in training checkpoints)
//             qopt_quant   the LinearQuantConfig (JSON): bit widths, grids, rules, Hadamard block
//             qopt_source  where it came from (JSON): checkpoint, preset, optimizer, step, seq_len
//   F32       every parameter that is not a hidden linear weight, under its usual name
//   F32       <name>.step, <name>.offset   one per group (row-major groups: per-tensor 1,
//             per-row rows, per-group rows * cols / group_size)
//   U8        <name>.qweight  the integer codes, row-major [rows, cols]: bits <= 4 packed two
//             per byte (column 2i in the low nibble, 2i+1 in the high one; 4-bit two's
//             complement), else one per byte (8-bit two's complement); shape [rows, ceil(cols/2)]
//             or [rows, cols]
// A weight is value = (code + offset) * step, in the rotated basis when qopt_quant's
// hadamard_block > 0 (the original weight is approximately value H, H the block Hadamard).
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "core/json.hpp"
#include "model/config.hpp"
#include "model/params.hpp"
#include "quant/linear_quant.hpp"
#include "quant/quantizer.hpp"

namespace qopt {

struct NamedQuantizedTensor {
    std::string name;  // the weight's parameter name
    QuantizedTensor tensor;
};

std::vector<uint8_t> pack_codes(const QuantizedTensor& q);
std::vector<int8_t> unpack_codes(const std::vector<uint8_t>& packed, int rows, int cols, int bits);

// Writes the file atomically.
void write_quantized_checkpoint(const std::string& path, const ModelConfig& config, const ParamLayout& layout,
                                const std::vector<float>& params, const std::vector<NamedQuantizedTensor>& weights,
                                const LinearQuantConfig& quant, const Json& source = Json::object());

}  // namespace qopt
