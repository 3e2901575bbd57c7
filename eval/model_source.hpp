// What an evaluation job loads: a training checkpoint directory (…/checkpoints/step_N) or a
// quantized checkpoint file written by `ptq --out` (quant/packed_checkpoint.hpp). Either way
// the result is fp32 parameters for the model; a quantized file's weights are dequantized (in
// the rotated basis) and come with the quantization to evaluate them under (weights offline,
// inputs quantized on the fly by the same quantizer code), so the fake-quant path reproduces
// what ptq measured.
#pragma once
#include <string>
#include <vector>

#include "core/json.hpp"
#include "model/config.hpp"
#include "quant/linear_quant.hpp"

namespace qopt {

struct EvalCheckpoint {
    ModelConfig config;
    std::vector<float> params;
    LinearQuantConfig quant;          // a quantized file's quantization (weights offline), or the
                                      // QAT quantizer a training checkpoint was trained with
    std::string optimizer = "?", preset = "?", trained_qat = "off";
    long step = -1;
    int train_seq_len = 0;            // the run's sequence length (0: unknown)
    bool quantized_file = false;
    std::vector<QuantizedTensor> quantized;  // a quantized file's stored matrices (linear_matrices order)
    std::string describe() const;     // "olmo2-50m, muon, step 300 (quantized w4a4 ...)"
    // The first fields of a results-table row about this checkpoint: time, checkpoint (path),
    // model, arch, parameters, non_embedding_parameters, optimizer, step, trained_qat.
    Json row_header(const std::string& path) const;
    // The sequence length to evaluate at: `requested`, or (0) the training run's, else the
    // model's max_seq_len; throws when it exceeds max_seq_len.
    int seq_len_or(int requested) const;
};

EvalCheckpoint load_eval_checkpoint(const std::string& path);

}  // namespace qopt
