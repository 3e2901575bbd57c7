// The study's error-propagation analysis (../shared/PAPER.md, "Metrics"), per module of the
// chain in model/modules.hpp, on calibration tokens:
//
//   h_l = f_l(h_{l-1}) (full precision), h^q_l = f^q_l(h^q_{l-1}) (hidden linear layers
//   quantized, RTN on the fly), dh_l = h^q_l - h_l = a_l + b_l with the Shapley halves
//     a = 1/2 [(f^q(h^q) - f^q(h)) + (f(h^q) - f(h))]   error carried in by the input
//     b = 1/2 [(f^q(h^q) - f(h^q)) + (f^q(h) - f(h))]   error the module itself adds
//   R = ||dh||^2 / ||h||^2 = A + B + C,  A = ||a||^2/||h||^2, B = ||b||^2/||h||^2, C = 2<a,b>/||h||^2
//   G = A_l / R_{l-1}  (gain of the incoming error; R_{l-1} is the chain's previous module)
//
// Only hidden linear layers differ between f and f^q, so elsewhere b = 0 and A = R. For a
// linear layer y = h W^T the four evaluations are f(h) and f^q(h^q) (the two forward passes)
// and f^q(h), f(h^q) (the layer alone on the other pass's input). Its gain factors as
// G ~= G1 G2 with
//   G1 = (||M||_2 / ||W||_2)^2,  M = W + eps_W/2 (eps_W = Q(W) - W, in the rotated basis when
//        rotating: ||.||_2 is unchanged by the orthogonal rotation)
//   G2 = (cos phi / cos psi)^2,  cos phi = ||dh M^T||_F / (||M||_2 ||dh||_F),
//                                cos psi = ||h W^T||_F / (||W||_2 ||h||_F)
// — our reading of the paper's "angle between the error and W + eps_W/2" (its appendix A.4):
// the fraction of the largest possible amplification that the rows of dh (resp. h) get. With
// weights alone quantized G = G1 G2 exactly (then a = dh M^T); activation quantization adds
// the difference, so both G and G1 G2 are reported.
//
// Every ratio is a ratio of sums over all calibration tokens (numerators and denominators
// accumulated over batches). Each linear layer also gets its input's outlier metrics
// (eval/outlier_metrics.hpp), weight statistics, and its local error ||f^q(h) - f(h)||^2/||f(h)||^2
// (the PTQ error of that layer alone).
#pragma once
#include <vector>

#include "core/json.hpp"
#include "model/modules.hpp"
#include "quant/linear_quant.hpp"

namespace qopt {

class EvalModel;

struct ModuleRecord {
    int layer = 0;
    Module module = Module::Embedding;
    double R = 0, A = 0, B = 0, C = 0;
    double G = -1;  // -1: undefined (the previous module has no error)
    // Linear layers only (site >= 0):
    int site = -1;
    double G1 = 0, G2 = 0, cos_phi = 0, cos_psi = 0, local_error = 0;
    double input_mmr_median = 0, input_mmr_mean = 0, input_kurtosis = 0, input_max_abs = 0;
    double weight_kurtosis = 0, weight_mmr_median = 0, weight_spectral_norm = 0, weight_frobenius = 0;
    double weight_quant_error = 0;  // ||Q(W) - W||_F / ||W||_F (rotated basis)
};

struct PropagationResult {
    std::vector<ModuleRecord> modules;  // chain order
    double loss_full = 0, loss_quantized = 0;
    long tokens = 0;
    Json to_json() const;   // modules + summary
    // R at the last block and at the final norm; MMRs and kurtosis of the linear layers' inputs
    // averaged over layers (max/median without the down projections, whose inputs are mostly
    // zero); mean local error; mean gain, G1, G2 of the linear layers.
    Json summary() const;
};

// Runs the analysis on the batches (each `batch` sequences of `seq_len` tokens, inputs and
// targets). params: the full-precision weights the model holds (for the weight statistics).
// quant: the PTQ configuration (RTN: weights quantized on the fly). The model is left with
// the quantization off.
PropagationResult analyze_error_propagation(EvalModel& model, const std::vector<float>& params,
                                            const LinearQuantConfig& quant,
                                            const std::vector<std::vector<int>>& inputs,
                                            const std::vector<std::vector<int>>& targets, int batch, int seq_len);

}  // namespace qopt
