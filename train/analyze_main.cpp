// analyze: the study's metrics for one checkpoint on calibration tokens — per hidden linear
// layer its input's MMR and kurtosis, weight statistics and its own PTQ error; per module the
// error-propagation analysis (R = A + B + C, gains G, G1, G2; eval/error_propagation.hpp).
// Writes the full result as JSON and appends a summary row to a JSONL table.
#include <CLI/CLI.hpp>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <iostream>

#include "core/error.hpp"
#include "core/files.hpp"
#include "data/loader.hpp"
#include "eval/error_propagation.hpp"
#include "eval/eval_model.hpp"
#include "eval/model_source.hpp"
#include "model/params.hpp"
#include "quant/quant_cli.hpp"
#include "train/train_cli.hpp"

namespace {

struct AnalyzeOptions {
    std::string checkpoint, device = "auto";
    int threads = 0;
    qopt::QuantOptions quant;
    std::string calib_data = qopt::kDefaultTrainData;
    int batches = 1, batch_size = 4, seq_len = 0;
    std::string out, results = "runs/analysis_results.jsonl";
};

int run(const AnalyzeOptions& o) {
    using namespace qopt;
    const auto start = std::chrono::steady_clock::now();
    if (o.threads > 0) omp_set_num_threads(o.threads);
    QOPT_CHECK(o.batches > 0 && o.batch_size > 0 && o.seq_len >= 0,
               "--batches and --batch-size must be positive, --seq-len non-negative");
    const EvalCheckpoint ckpt = load_eval_checkpoint(o.checkpoint);
    QOPT_CHECK(!ckpt.quantized_file, o.checkpoint, ": the analysis compares a full-precision checkpoint with its "
               "quantized self; give the training checkpoint");
    const ModelConfig& config = ckpt.config;
    const LinearQuantConfig quant = resolve_linear_quant(o.quant, QuantStyle::Rtn);
    QOPT_CHECK(quant.enabled(), "--format ", o.quant.format, " quantizes nothing");
    quant.validate(config.d_model, config.d_ff);
    const int seq_len = ckpt.seq_len_or(o.seq_len);
    const std::string out = o.out.empty() ? o.checkpoint + "/analysis_" + quant.short_name() + ".json" : o.out;
    check_writable_directory(parent_directory(out));
    check_writable_directory(parent_directory(o.results));

    TokenLoader calib(o.calib_data, config.vocab_size, o.batch_size, seq_len, "--calib-data");
    std::vector<std::vector<int>> inputs(size_t(o.batches)), targets(size_t(o.batches));
    for (int b = 0; b < o.batches; ++b) calib.next_batch(inputs[size_t(b)], targets[size_t(b)]);

    std::unique_ptr<EvalModel> model = make_eval_model(config, o.device);
    model->set_params(ckpt.params);
    std::cout << "checkpoint: " << o.checkpoint << " (" << ckpt.describe() << ")\n";
    std::cout << "device: " << model->describe() << "\n";
    std::cout << "quantization: " << quant.describe(false) << "\n";
    std::cout << "calibration: " << o.batches << " x " << o.batch_size << " x " << seq_len << " tokens" << std::endl;

    const PropagationResult result = analyze_error_propagation(*model, ckpt.params, quant, inputs, targets,
                                                               o.batch_size, seq_len);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    std::printf("%5s %-14s %10s %10s %10s %10s %8s %8s %8s %9s %9s\n", "layer", "module", "R", "A", "B", "C", "G",
                "G1", "G2", "MMR(in)", "kurt(in)");
    for (const ModuleRecord& r : result.modules) {
        const bool show = r.site >= 0 || module_is_norm(r.module) || r.module == Module::MlpResidual;
        if (!show) continue;
        std::printf("%5d %-14s %10.3e %10.3e %10.3e %10.3e ", r.layer, module_name(r.module), r.R, r.A, r.B, r.C);
        if (r.G >= 0) std::printf("%8.3f ", r.G);
        else std::printf("%8s ", "-");
        if (r.site >= 0)
            std::printf("%8.3f %8.3f %9.2f %9.2f\n", r.G1, r.G2, r.input_mmr_median, r.input_kurtosis);
        else
            std::printf("\n");
    }
    Json json = result.to_json();
    Json summary = result.summary();
    std::cout << "summary: " << summary.dump() << "\n";
    Json header = ckpt.row_header(o.checkpoint);
    header["format"] = quant.short_name();
    header["quant"] = quant.to_json();
    header["seconds"] = seconds;
    Json full = header;
    full["summary"] = json.at("summary");
    full["modules"] = json.at("modules");
    write_file_atomic(out, full.dump() + "\n");
    Json row = header;
    row["analysis"] = out;
    for (const auto& [key, value] : summary.items()) row[key] = value;
    append_line(o.results, row.dump());
    std::printf("analysis: %s (%.1f s); summary appended to %s\n", out.c_str(), seconds, o.results.c_str());
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{
        "qopt analyze: outlier metrics (MMR, kurtosis) and the error-propagation analysis (R = A + B + C per module, "
        "gains G = G1 G2 of linear layers) of a checkpoint under RTN quantization, on calibration tokens"};
    AnalyzeOptions o;
    o.quant.format = "w4a4";
    app.option_defaults()->always_capture_default();
    app.add_option("--checkpoint", o.checkpoint, "Training checkpoint directory (…/checkpoints/step_N)")->required();
    qopt::add_quant_flags(app, o.quant, "", qopt::QuantStyle::Rtn);
    app.add_option("--calib-data", o.calib_data, "Calibration shards (glob, llm.c .bin)")->group("Data");
    app.add_option("--batches", o.batches, "Calibration batches")->group("Data");
    app.add_option("--batch-size,-b", o.batch_size, "Sequences per batch")->group("Data");
    app.add_option("--seq-len,-t", o.seq_len, "Tokens per sequence (0: the training run's)")->group("Data");
    qopt::add_device_flags(app, o.device, o.threads);
    app.add_option("--out", o.out, "Full result (JSON); default <checkpoint>/analysis_<format>.json")->group("Output");
    app.add_option("--results", o.results, "Summary table (JSONL) the row is appended to")->group("Output");
    return qopt::run_main(app, argc, argv, "analyze", [&] { return run(o); });
}
