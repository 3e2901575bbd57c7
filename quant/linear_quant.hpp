// How the hidden linear layers compute when quantized: the layer's input rows (per token) and
// weight rows (per output channel, [out, in]) are rotated by a block Hadamard transform along
// the input dimension and fake-quantized; the product then runs on the quantized operands:
//     out = Q_a(x H) Q_w(w H)^T + bias        (= x w^T + bias when nothing is quantized)
// Backward (the estimator, QuEST): with masks m_a, m_w of the elements whose gradient passes,
//     dx = ((dout Q_w(w H)) * m_a) H,   dw = ((dout^T Q_a(x H)) * m_w) H       (H = H^T = H^-1)
// The layers are q/k/v (one fused product), the attention output, MLP up and down of every
// block; the tied embedding / head stays in full precision (QuEST and the study do the same).
//
// The same configuration serves QAT (weights quantized from the fp32 masters in every
// forward pass) and PTQ evaluation (weights_offline: the weights were rotated and quantized
// once by `ptq` and are used as they are; only the activations are quantized on the fly).
#pragma once
#include <string>

#include "core/json.hpp"
#include "quant/quantizer.hpp"

namespace qopt {

struct LinearQuantConfig {
    QuantSpec weights, activations;  // bits 16: that side is not quantized
    int hadamard_block = 0;          // requested block (0: no rotation); per dimension see hadamard_block_for
    float trust = 0;                 // estimator: < 0 straight-through; 0 half a step; > 0 trust * RMS(row)
    bool weights_offline = false;    // PTQ: weights already rotated and quantized

    bool enabled() const { return weights.enabled() || activations.enabled() || hadamard_block > 1; }
    void validate(int d_model, int d_ff) const;  // throws naming the problem
    // "w4a4 (weights: int4 centered gaussian per-row; ...; trust estimator ...)"; the estimator
    // only matters for training.
    std::string describe(bool with_estimator = true) const;
    std::string short_name() const;              // "w4a4", "w4a16", "off"
    Json to_json() const;
    static LinearQuantConfig from_json(const Json& json);
};

// The flags as the user typed them; resolve() turns them into a config.
struct QuantOptions {
    std::string format = "off";  // wXaY: w4a4, w4a16, w8a8, ... ("off" = w16a16)
    std::string grid, weight_rule, act_rule, granularity;  // empty: the style's default
    int group_size = 128;
    int hadamard = -1;           // -1: the style's default
    float clip_ratio = 0.9f;
    std::string estimator;       // trust | ste (empty: trust)
    float trust = 0;
};

// Defaults differ by use: QAT follows QuEST (centered grid, Gaussian scale, Hadamard 128,
// trust estimator); PTQ follows the study's RTN (symmetric absmax, no rotation).
enum class QuantStyle { Quest, Rtn };
LinearQuantConfig resolve_linear_quant(const QuantOptions& options, QuantStyle style);

}  // namespace qopt
