// Post-training quantization of a checkpoint (the `ptq` binary): validation loss in full
// precision, optional calibration (GPTQ's Hessians from the train shards), weights of every
// hidden linear layer rotated (optional Hadamard) and quantized by RTN or GPTQ, validation
// loss of the quantized model (activations fake-quantized on the fly by the same quantizer
// code the QAT forward uses), one results row appended to a JSONL table, and optionally the
// quantized checkpoint (packed integer codes + scales; layout in quant/packed_checkpoint.hpp).
#pragma once
#include <ostream>
#include <string>

#include "core/json.hpp"
#include "quant/gptq.hpp"
#include "quant/linear_quant.hpp"

namespace qopt {

struct PtqOptions {
    std::string checkpoint;          // a training checkpoint directory
    QuantOptions quant;              // --format w4a4 ... (RTN-style defaults)
    std::string method = "rtn";      // rtn | gptq
    GptqOptions gptq;
    std::string calib_data, val_data;  // shard patterns
    int calib_batches = 8, val_batches = 20, batch_size = 8, seq_len = 0;  // seq_len 0: the run's
    std::string device = "auto";       // cpu | cuda | auto
    int threads = 0;
    std::string out;                   // quantized checkpoint file (.safetensors); empty: none
    std::string results = "runs/ptq_results.jsonl";
};

struct PtqResult {
    double val_loss_full = 0, val_loss_quantized = 0;
    Json row;  // the results-table row that was appended
};

PtqResult run_ptq(const PtqOptions& options, std::ostream& log);

}  // namespace qopt
