// eval: evaluate a checkpoint (training checkpoint or `ptq --out` quantized file) — validation
// loss and perplexity, zero-shot multiple-choice tasks scored like the LM Evaluation Harness,
// and text generation; optionally with the hidden linear layers quantized on the fly (RTN).
// One row per run is appended to a JSONL results table.
#include <CLI/CLI.hpp>
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>

#include "core/error.hpp"
#include "core/files.hpp"
#include "data/loader.hpp"
#include "data/tokenizer.hpp"
#include "eval/eval_model.hpp"
#include "eval/generate.hpp"
#include "eval/model_source.hpp"
#include "eval/multiple_choice.hpp"
#include "model/params.hpp"
#include "quant/integer_execution.hpp"
#include "quant/quant_cli.hpp"
#include "train/train_cli.hpp"

namespace {

struct EvalOptions {
    std::string checkpoint, device = "auto", tokenizer = "build/data/gpt2";
    int threads = 0;
    std::string val_data = qopt::kDefaultValData;
    int val_batches = 20, batch_size = 8, seq_len = 0;
    std::vector<std::string> tasks;
    std::string task_format = "auto";
    int task_limit = 0;
    std::vector<std::string> prompts;
    qopt::GenerateOptions generate;
    qopt::QuantOptions quant;
    bool integer = false;
    std::string results = "runs/eval_results.jsonl";
};

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::string task_name(const std::string& path) {
    std::string name = path.substr(path.find_last_of('/') + 1);
    const size_t dot = name.find('.');
    return dot == std::string::npos ? name : name.substr(0, dot);
}

int run(EvalOptions& o) {
    using namespace qopt;
    if (o.threads > 0) omp_set_num_threads(o.threads);
    QOPT_CHECK(o.batch_size > 0 && o.seq_len >= 0, "--batch-size must be positive and --seq-len non-negative");
    QOPT_CHECK(o.val_batches >= -1, "--val-batches must be -1 (all), 0 (skip) or positive");
    EvalCheckpoint ckpt = load_eval_checkpoint(o.checkpoint);
    const ModelConfig& config = ckpt.config;
    // The quantization evaluated: --format wXaY quantizes a full-precision checkpoint on the fly
    // (RTN); by default ("checkpoint") a quantized file is evaluated with its own quantization and
    // a QAT checkpoint with the quantizer it was trained with; --format off: none at all.
    LinearQuantConfig quant;
    if (o.quant.format == "checkpoint") {
        quant = ckpt.quant;
    } else {
        quant = resolve_linear_quant(o.quant, QuantStyle::Rtn);
        QOPT_CHECK(!(quant.enabled() && ckpt.quantized_file), o.checkpoint,
                   " is already quantized; --format applies to full-precision checkpoints");
        QOPT_CHECK(quant.enabled() || !ckpt.quantized_file, o.checkpoint,
                   " holds quantized weights; they cannot be evaluated unquantized");
        quant.validate(config.d_model, config.d_ff);
    }
    const int seq_len = ckpt.seq_len_or(o.seq_len);
    check_writable_directory(parent_directory(o.results));
    std::unique_ptr<Tokenizer> tokenizer;
    if (!o.prompts.empty() || !o.tasks.empty()) {
        if (is_directory(o.tokenizer)) tokenizer = std::make_unique<Tokenizer>(Tokenizer::load_dir(o.tokenizer));
        else QOPT_CHECK(o.prompts.empty(), "--tokenizer ", o.tokenizer, ": no such directory (needed for --prompt)");
    }
    std::unique_ptr<TokenLoader> val;
    if (o.val_batches != 0) val = std::make_unique<TokenLoader>(o.val_data, config.vocab_size, o.batch_size, seq_len,
                                                                "--val-data");

    std::unique_ptr<EvalModel> model = make_eval_model(config, o.device);
    model->set_params(ckpt.params);
    if (quant.enabled()) model->set_linear_quant(quant);
    if (o.integer) {
        QOPT_CHECK(quant.enabled(), "--integer needs a quantized evaluation (--format wXaY or a quantized file)");
        model->run_in_integers(integer_matrices(config, ckpt.params, quant, ckpt.quantized_file ? &ckpt.quantized : nullptr));
    }
    std::cout << "checkpoint: " << o.checkpoint << " (" << ckpt.describe() << ")\n";
    std::cout << "device: " << model->describe() << "\n";
    std::cout << "quantization: " << (quant.enabled() ? quant.describe(false) : std::string("off"))
              << (quant.enabled() ? (o.integer ? std::string(", executed in integers (") + integer_execution_name(quant) + ")"
                                               : std::string(", executed as fake-quant in bf16"))
                                  : std::string())
              << std::endl;

    Json row = ckpt.row_header(o.checkpoint);
    row["format"] = quant.enabled() ? quant.short_name() : std::string("off");
    if (quant.enabled()) row["quant"] = quant.to_json();
    if (quant.enabled()) row["execution"] = o.integer ? "integer" : "fake-quant";

    if (val) {
        const uint64_t available = val->batches_per_epoch();
        const int batches = int(o.val_batches < 0 ? available : std::min<uint64_t>(uint64_t(o.val_batches), available));
        double seconds = 0;
        const double loss = mean_loss(*model, *val, batches, o.batch_size, seq_len, &seconds);
        const double tokens = double(batches) * o.batch_size * seq_len;
        const double tokens_per_second = batches > 1 ? double(batches - 1) * o.batch_size * seq_len / seconds : 0.0;
        char line[200];
        std::snprintf(line, sizeof line,
                      "val loss %.4f, perplexity %.2f (%d batches of %d x %d; %.0f tokens/s after the first)\n", loss,
                      std::exp(loss), batches, o.batch_size, seq_len, tokens_per_second);
        std::cout << line << std::flush;
        QOPT_CHECK(std::isfinite(loss), "validation loss is not finite: the checkpoint's weights are damaged");
        row["val_loss"] = loss;
        row["perplexity"] = std::exp(loss);
        row["val_tokens"] = int64_t(tokens);
        row["val_tokens_per_second"] = tokens_per_second;
    }

    Json tasks = Json::object();
    double accuracy_sum = 0;
    for (const std::string& path : o.tasks) {
        const auto start = std::chrono::steady_clock::now();
        const std::vector<ChoiceExample> examples = read_choice_task(path, o.task_format, tokenizer.get(), o.task_limit);
        const ChoiceResult r = score_choices(*model, examples, o.batch_size);
        char line[256];
        std::snprintf(line, sizeof line, "task %s: acc %.4f +- %.4f, acc_norm %.4f (%d examples, %.1f s)\n",
                      task_name(path).c_str(), r.acc, r.acc_stderr, r.acc_norm, r.examples, seconds_since(start));
        std::cout << line << std::flush;
        Json t = Json::object();
        t["path"] = path;
        t["examples"] = r.examples;
        t["acc"] = r.acc;
        t["acc_stderr"] = r.acc_stderr;
        t["acc_norm"] = r.acc_norm;
        tasks[task_name(path)] = t;
        accuracy_sum += r.acc_norm;
    }
    if (!o.tasks.empty()) {
        row["tasks"] = tasks;
        row["mean_acc_norm"] = accuracy_sum / double(o.tasks.size());
    }

    const size_t embed = ParamLayout::build(config).embed;
    for (const std::string& prompt : o.prompts) {
        o.generate.stop_token = tokenizer->eot_id();
        const std::vector<int> ids = tokenizer->encode(prompt);
        const std::vector<int> out = generate(*model, ckpt.params.data() + embed, ids, o.generate);
        std::cout << "--- prompt: " << prompt << "\n" << prompt << tokenizer->decode(out) << "\n---" << std::endl;
    }

    if (val || !o.tasks.empty()) {
        append_line(o.results, row.dump());
        std::cout << "results: appended to " << o.results << "\n";
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{
        "qopt eval: validation loss/perplexity, zero-shot multiple-choice accuracy (LM Evaluation Harness scoring) "
        "and text generation for a training checkpoint or a ptq quantized file"};
    EvalOptions o;
    o.quant.format = "checkpoint";
    app.option_defaults()->always_capture_default();
    app.add_option("--checkpoint", o.checkpoint,
                   "Training checkpoint directory (…/checkpoints/step_N) or quantized .safetensors from ptq --out")
        ->required();
    app.add_option("--val-data", o.val_data, "Validation shards (glob, llm.c .bin)")->group("Validation");
    app.add_option("--val-batches", o.val_batches, "Validation batches: -1 the whole set, 0 skip")->group("Validation");
    app.add_option("--batch-size,-b", o.batch_size, "Sequences per batch (validation and task rows)")
        ->group("Validation");
    app.add_option("--seq-len,-t", o.seq_len, "Tokens per validation sequence (0: the training run's)")
        ->group("Validation");
    app.add_option("--task", o.tasks,
                   "Multiple-choice task file, repeatable: HellaSwag JSONL, llm.c HellaSwag .bin, or JSONL lines "
                   "{\"context\", \"choices\", \"label\"}")
        ->group("Tasks");
    app.add_option("--task-format", o.task_format, "hellaswag, hellaswag-bin, choices or auto (by extension/content)")
        ->group("Tasks");
    app.add_option("--task-limit", o.task_limit, "Score only the first N examples of each task (0: all)")
        ->group("Tasks");
    app.add_option("--tokenizer", o.tokenizer, "Directory with GPT-2's encoder.json and vocab.bpe")->group("Tasks");
    app.add_option("--prompt", o.prompts, "Generate a continuation of this text (repeatable)")->group("Generation");
    app.add_option("--max-new-tokens", o.generate.max_new_tokens, "Tokens to generate per prompt")
        ->group("Generation");
    app.add_option("--temperature", o.generate.sample.temperature, "Sampling temperature (0: greedy)")
        ->group("Generation");
    app.add_option("--top-k", o.generate.sample.top_k, "Sample among the k most likely tokens (0: all)")
        ->group("Generation");
    app.add_option("--seed", o.generate.seed, "Sampling seed")->group("Generation");
    qopt::add_quant_flags(app, o.quant, "", qopt::QuantStyle::Rtn);
    app.get_option("--format")
        ->description("checkpoint (default: a quantized file's own quantization, a QAT checkpoint's training "
                      "quantizer, else none), off, or wXaY to quantize a full-precision checkpoint on the fly (RTN)");
    app.add_flag("--integer", o.integer,
                 "Run the quantized hidden layers in integers instead of fake-quant in bf16 (GPU): W8A8-style formats "
                 "(per-row weights, per-token activations; symmetric or QuEST's centered grid) on int8 tensor cores, or on fp8 "
                 "tensor cores with the scales in the GEMM's epilogue when both sides have at most 5 bits (W4A4), "
                 "weight-only "
                 "formats with 2-4-bit weights (any grid, groups of a multiple of 16) as packed 4-bit weights "
                 "dequantized inside the GEMM")
        ->group("Quantization");
    qopt::add_device_flags(app, o.device, o.threads);
    app.add_option("--results", o.results, "Results table (JSONL) the row is appended to")->group("Output");
    return qopt::run_main(app, argc, argv, "eval", [&] { return run(o); });
}
