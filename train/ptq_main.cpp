// ptq: post-training quantization of a checkpoint (RTN or GPTQ) with validation loss before
// and after, a results-table row, and optionally the packed quantized checkpoint.
#include <CLI/CLI.hpp>
#include <iostream>

#include "core/error.hpp"
#include "quant/ptq.hpp"
#include "quant/quant_cli.hpp"
#include "train/train_cli.hpp"

int main(int argc, char** argv) {
    CLI::App app{
        "qopt ptq: quantize a trained checkpoint's hidden linear layers (weights by RTN or GPTQ, inputs on the fly) "
        "and report validation loss before and after"};
    qopt::PtqOptions o;
    o.quant.format = "w4a4";
    o.calib_data = qopt::kDefaultTrainData;
    o.val_data = qopt::kDefaultValData;
    app.option_defaults()->always_capture_default();
    app.add_option("--checkpoint", o.checkpoint, "Training checkpoint directory (…/checkpoints/step_N)")->required();
    qopt::add_quant_flags(app, o.quant, "", qopt::QuantStyle::Rtn);
    app.add_option("--method", o.method, "Weight quantizer: rtn (round to nearest) or gptq (on the GPU when the model runs there)")->group("Method");
    app.add_option("--damp", o.gptq.damp, "GPTQ damping, a fraction of the Hessian's mean diagonal")->group("Method");
    app.add_flag("--act-order", o.gptq.act_order, "GPTQ: quantize columns by descending Hessian diagonal")
        ->group("Method");
    app.add_option("--calib-data", o.calib_data, "Calibration shards for GPTQ (glob, llm.c .bin)")->group("Data");
    app.add_option("--calib-batches", o.calib_batches, "Calibration batches (GPTQ)")->group("Data");
    app.add_option("--val-data", o.val_data, "Validation shards (glob, llm.c .bin)")->group("Data");
    app.add_option("--val-batches", o.val_batches, "Validation batches (at most the whole set)")->group("Data");
    app.add_option("--batch-size,-b", o.batch_size, "Sequences per batch")->group("Data");
    app.add_option("--seq-len,-t", o.seq_len, "Tokens per sequence (0: the training run's)")->group("Data");
    qopt::add_device_flags(app, o.device, o.threads);
    app.add_option("--out", o.out, "Write the quantized checkpoint here (.safetensors; empty: do not)")->group("Output");
    app.add_option("--results", o.results, "Results table (JSONL) the row is appended to")->group("Output");
    return qopt::run_main(app, argc, argv, "ptq", [&] {
        qopt::run_ptq(o, std::cout);
        return 0;
    });
}
