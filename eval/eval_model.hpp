// A model for evaluation jobs (ptq, eval, analyze): forward passes only, on the CPU reference
// (fp32) or the GPU (bf16), behind one interface, so every analysis is written once and runs
// on either. Values cross the interface as host fp32 arrays.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "model/modules.hpp"
#include "quant/quantizer.hpp"
#include "quant/linear_quant.hpp"

namespace qopt {

class EvalModel {
public:
    virtual ~EvalModel() = default;
    virtual std::string describe() const = 0;  // "cpu, 16 threads" / "cuda, NVIDIA H100 ..."
    virtual bool on_gpu() const = 0;
    virtual const ModelConfig& config() const = 0;
    virtual void set_params(const std::vector<float>& params) = 0;
    virtual void set_linear_quant(const LinearQuantConfig& quant) = 0;
    // Real integer execution of the hidden linear layers (quant/integer_execution.hpp) under the
    // current quantized configuration, with these weights; GPU only (the CPU throws).
    virtual void run_in_integers(const std::vector<QuantizedTensor>& matrices) = 0;

    // Mean loss of the batch; token_losses() then holds the B*T per-token losses.
    virtual double loss(const int* inputs, const int* targets, int batch, int seq_len) = 0;
    virtual std::vector<float> token_losses() = 0;

    // Module outputs (model/modules.hpp) of the next forward passes, as host fp32 [rows, cols],
    // for the modules `wanted` selects (all when empty). Empty hook: none.
    using ModuleTap = std::function<void(int layer, Module module, const float* output, int rows, int cols)>;
    using ModuleFilter = std::function<bool(int layer, Module module)>;
    virtual void set_module_tap(ModuleTap tap, ModuleFilter wanted = {}) = 0;
    // CpuModel::linear_apply on host rows (GPU: rows at most the last forward's B*T).
    virtual void linear_apply(int layer, int site, std::vector<float>& out, const float* input, int rows,
                              bool quantize_weight, bool quantize_input, bool add_bias) = 0;

    // GPTQ's Hessians H = sum over tokens of x x^T of every hidden linear layer's input as the
    // product sees it: from start_hessians() on, every forward adds to them.
    virtual void start_hessians() = 0;
    virtual std::vector<std::vector<double>> finish_hessians() = 0;  // [layer * 4 + site], row-major
};

class TokenLoader;
// Mean loss over the first `batches` batches of the loader (from its start). With
// seconds_after_first, also the time the batches after the first took (the first also plans
// the model's buffers and picks the GEMM algorithms), for a steady-state throughput.
double mean_loss(EvalModel& model, TokenLoader& loader, int batches, int batch_size, int seq_len,
                 double* seconds_after_first = nullptr);

// device: "cpu", "cuda" or "auto" (the GPU when usable and the model's shapes are supported).
// Throws qopt::Error naming the reason when "cuda" cannot be had.
std::unique_ptr<EvalModel> make_eval_model(const ModelConfig& config, const std::string& device);

}  // namespace qopt
