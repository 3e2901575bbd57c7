#include "quant/ptq.hpp"

#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>

#include "core/error.hpp"
#include "core/files.hpp"
#include "data/loader.hpp"
#include "eval/eval_model.hpp"
#include "quant/hadamard.hpp"
#include "quant/packed_checkpoint.hpp"
#include "eval/model_source.hpp"

namespace qopt {

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

PtqResult run_ptq(const PtqOptions& options, std::ostream& log) {
    PtqOptions o = options;
    QOPT_CHECK(!o.checkpoint.empty(), "--checkpoint is required");
    QOPT_CHECK(o.method == "rtn" || o.method == "gptq", "--method must be rtn or gptq, got '", o.method, "'");
    QOPT_CHECK(o.device == "cpu" || o.device == "cuda" || o.device == "auto", "--device must be cpu, cuda or auto");
    QOPT_CHECK(o.batch_size > 0 && o.seq_len >= 0, "--batch-size must be positive and --seq-len non-negative");
    QOPT_CHECK(o.val_batches > 0, "--val-batches must be positive");
    QOPT_CHECK(o.method != "gptq" || o.calib_batches > 0, "--calib-batches must be positive for GPTQ");
    if (o.threads > 0) omp_set_num_threads(o.threads);

    LinearQuantConfig quant = resolve_linear_quant(o.quant, QuantStyle::Rtn);
    QOPT_CHECK(quant.weights.enabled() || quant.activations.enabled(), "--format ", o.quant.format,
               " quantizes nothing");
    const EvalCheckpoint ckpt = load_eval_checkpoint(o.checkpoint);
    QOPT_CHECK(!ckpt.quantized_file, o.checkpoint, ": already quantized; ptq takes a training checkpoint");
    const ModelConfig& config = ckpt.config;
    quant.validate(config.d_model, config.d_ff);
    o.seq_len = ckpt.seq_len_or(o.seq_len);
    TokenLoader val(o.val_data, config.vocab_size, o.batch_size, o.seq_len, "--val-data");
    const int val_batches = int(std::min<uint64_t>(uint64_t(o.val_batches), val.batches_per_epoch()));
    std::unique_ptr<TokenLoader> calib;
    if (o.method == "gptq")
        calib = std::make_unique<TokenLoader>(o.calib_data, config.vocab_size, o.batch_size, o.seq_len, "--calib-data");
    if (!o.out.empty()) check_writable_directory(parent_directory(o.out));
    check_writable_directory(parent_directory(o.results));

    std::unique_ptr<EvalModel> model = make_eval_model(config, o.device);
    model->set_params(ckpt.params);
    log << "checkpoint: " << o.checkpoint << " (" << ckpt.describe() << ")\n";
    log << "device: " << model->describe() << "\n";
    log << "quantization: " << o.method << ", " << quant.describe(false) << std::endl;

    const double loss_full = mean_loss(*model, val, val_batches, o.batch_size, o.seq_len);
    log << "val loss full precision: " << loss_full << " (" << val_batches << " batches of " << o.batch_size << " x "
        << o.seq_len << ")" << std::endl;

    // GPTQ's Hessians, in the rotated basis when rotating (the forward rotates, nothing else).
    const auto quantize_start = std::chrono::steady_clock::now();
    std::vector<std::vector<double>> hessians;
    if (o.method == "gptq") {
        LinearQuantConfig rotate_only;
        rotate_only.hadamard_block = quant.hadamard_block;
        model->set_linear_quant(rotate_only);
        model->start_hessians();
        calib->reset();
        std::vector<int> inputs, targets;
        for (int b = 0; b < o.calib_batches; ++b) {
            calib->next_batch(inputs, targets);
            model->loss(inputs.data(), targets.data(), o.batch_size, o.seq_len);
        }
        hessians = model->finish_hessians();
        log << "calibration: " << o.calib_batches << " batches (" << o.calib_batches * o.batch_size * o.seq_len
            << " tokens) in " << seconds_since(quantize_start) << " s" << std::endl;
    }

    // Weights: rotate, quantize (RTN or GPTQ), store the dequantized values in the rotated basis.
    const ParamLayout layout = ParamLayout::build(config);
    std::vector<float> params = ckpt.params;
    std::vector<NamedQuantizedTensor> packed;
    double error_sum = 0, norm_sum = 0;
    for (const LinearMatrix& m : linear_matrices(config, layout)) {
        const size_t n = size_t(m.rows) * m.cols;
        std::vector<float> w(params.begin() + long(m.offset), params.begin() + long(m.offset + n));
        hadamard_rows_cpu(w.data(), m.rows, m.cols, hadamard_block_for(m.cols, quant.hadamard_block));
        if (!quant.weights.enabled()) {  // W16: only rotated
            std::copy(w.begin(), w.end(), params.begin() + long(m.offset));
            continue;
        }
        // GPTQ runs where the model runs (the GPU version: quant/gptq_gpu.cu).
        const auto gptq = model->on_gpu() ? gptq_quantize_gpu : gptq_quantize;
        QuantizedTensor q = o.method == "gptq"
                                ? gptq(w.data(), m.rows, m.cols, hessians[size_t(m.layer) * kLinearSites + m.site],
                                       quant.weights, o.gptq)
                                : quantize_cpu(w.data(), m.rows, m.cols, quant.weights);
        const std::vector<float> deq = q.dequantize();
        for (size_t i = 0; i < n; ++i) {
            error_sum += double(deq[i] - w[i]) * double(deq[i] - w[i]);
            norm_sum += double(w[i]) * double(w[i]);
        }
        std::copy(deq.begin(), deq.end(), params.begin() + long(m.offset));
        packed.push_back({m.name, std::move(q)});
        if (m.site == kSiteDown && o.method == "gptq")
            log << "  block " << m.layer + 1 << "/" << config.n_layers << " quantized (" << seconds_since(quantize_start)
                << " s)" << std::endl;
    }
    const double quantize_seconds = seconds_since(quantize_start);
    const double weight_error = norm_sum > 0 ? std::sqrt(error_sum / norm_sum) : 0.0;
    log << "weights quantized in " << quantize_seconds << " s; relative weight error " << weight_error << std::endl;

    LinearQuantConfig eval_quant = quant;
    eval_quant.weights_offline = true;
    model->set_params(params);
    model->set_linear_quant(eval_quant);
    const double loss_quant = mean_loss(*model, val, val_batches, o.batch_size, o.seq_len);
    char line[200];
    std::snprintf(line, sizeof line, "val loss %s: %.4f (perplexity %.2f) vs %.4f (perplexity %.2f): %+.4f\n",
                  quant.short_name().c_str(), loss_quant, std::exp(loss_quant), loss_full, std::exp(loss_full),
                  loss_quant - loss_full);
    log << line;

    if (!o.out.empty()) {
        Json source = Json::object();
        source["checkpoint"] = o.checkpoint;
        source["preset"] = ckpt.preset;
        source["optimizer"] = ckpt.optimizer;
        source["step"] = int64_t(ckpt.step);
        source["seq_len"] = o.seq_len;
        source["trained_qat"] = ckpt.trained_qat;
        source["method"] = o.method;
        write_quantized_checkpoint(o.out, config, layout, params, packed, quant, source);
        log << "quantized checkpoint: " << o.out << "\n";
    }

    Json row = ckpt.row_header(o.checkpoint);
    row["method"] = o.method;
    row["format"] = quant.short_name();
    row["quant"] = quant.to_json();
    if (o.method == "gptq") {
        row["gptq_damp"] = o.gptq.damp;
        row["gptq_act_order"] = o.gptq.act_order;
        row["calib_tokens"] = int64_t(o.calib_batches) * o.batch_size * o.seq_len;
    }
    row["val_tokens"] = int64_t(val_batches) * o.batch_size * o.seq_len;
    row["val_loss_full"] = loss_full;
    row["val_loss_quantized"] = loss_quant;
    row["perplexity_full"] = std::exp(loss_full);
    row["perplexity_quantized"] = std::exp(loss_quant);
    row["loss_increase"] = loss_quant - loss_full;
    row["relative_weight_error"] = weight_error;
    row["quantize_seconds"] = quantize_seconds;
    append_line(o.results, row.dump());
    log << "results: appended to " << o.results << "\n";
    return PtqResult{loss_full, loss_quant, row};
}

}  // namespace qopt
