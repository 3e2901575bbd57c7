// The whole model on the GPU, composed from the kernels in kernels/ (launchers in
// kernels/gpu.hpp) in the same order as the CPU reference (model/cpu_model.cpp), which is its
// oracle. Mixed precision: fp32 master weights and gradients in one contiguous buffer each
// (layout: model/params.hpp), a bf16 mirror of the weights for compute, bf16 activations, fp32
// norm statistics, softmax statistics and losses. All activations for a (batch, seq_len) are
// planned once by allocate(); memory_report() prints the footprint before step 1.
#pragma once
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/gpu.hpp"
#include "model/config.hpp"
#include "model/modules.hpp"
#include "model/params.hpp"
#include "quant/quantizer.hpp"
#include "quant/linear_quant.hpp"

namespace qopt {

class GpuModel {
public:
    explicit GpuModel(const ModelConfig& config);
    // Empty when the GPU kernels can run this shape, else the reason (e.g. an unsupported head_dim).
    static std::string unsupported_reason(const ModelConfig& config);
    ~GpuModel();
    GpuModel(const GpuModel&) = delete;
    GpuModel& operator=(const GpuModel&) = delete;

    const ModelConfig& config() const { return config_; }
    const ParamLayout& layout() const { return layout_; }

    // Master weights (fp32): upload refreshes the bf16 mirror.
    void upload_params(const std::vector<float>& host);
    std::vector<float> download_params() const;
    std::vector<float> download_grads() const;
    float* params_device();
    float* grads_device();
    bf16* compute_weights_device();  // the bf16 mirror: the optimizer rewrites it with each update
    void zero_grads();

    // Activation recomputation: the MLP activation (GELU / ReLU² of the up projection, the
    // largest per-block tensor) is not kept per block but recomputed in the backward pass,
    // saving n_layers x B x T x d_ff bf16 for one extra elementwise pass per block.
    void set_recompute(bool recompute);
    bool recompute() const;
    // Quantized hidden linear layers (QAT / PTQ evaluation; quant/linear_quant.hpp), as
    // CpuModel::set_linear_quant. Adds each layer's quantized inputs and masks to the plan.
    void set_linear_quant(const LinearQuantConfig& quant);
    const LinearQuantConfig& linear_quant() const;
    // Real integer execution (quant/integer_execution.hpp): from now on every hidden linear layer
    // runs on the integer path of the config (integer_path): W8A8-style as int8 codes x int8
    // codes -> int32 -> scales with the inputs quantized per token at run time by the config's
    // activation spec, weight-only as the packed-4-bit GEMM on the bf16 inputs; inputs rotated
    // first when the config rotates. The weights' codes and grids are given here per matrix
    // (linear_matrices order, in the rotated basis). Needs a quantized config with offline
    // weights. Forward only; an empty list turns it off.
    void set_integer_weights(const std::vector<QuantizedTensor>& per_matrix);
    // As CpuModel::set_input_hook, with the bf16 device pointer of the product's input.
    using InputHook = std::function<void(int layer, int site, const bf16* input, int rows, int cols)>;
    void set_input_hook(InputHook hook);
    // As CpuModel::set_module_hook, with bf16 device pointers valid during the call. (olmo2's
    // post-sublayer norms are fused with the residual add; with a hook set they are also
    // written to a scratch buffer so that they can be shown.)
    using ModuleHook = std::function<void(int layer, Module module, const bf16* output, int rows, int cols)>;
    void set_module_hook(ModuleHook hook);
    // Called by the backward pass as soon as a part of the gradient buffer is final (its
    // kernels enqueued on the default stream): block l's tensors with the blocks above and the
    // final norm as one part ([layout.layer_starts[l], total) for the top block), then each block
    // below on its own, and last the embeddings ([0, layer_starts[0]): the tied head's gradient
    // is complete only at the end). The parts cover the buffer once. Data-parallel training
    // reduces them while the backward pass goes on. An empty hook turns it off.
    using GradientsReadyHook = std::function<void(size_t offset, size_t count)>;
    void set_gradients_ready_hook(GradientsReadyHook hook);
    // As CpuModel::linear_apply, on device rows (at most the planned batch x seq_len of the
    // last forward, whose quantized weights it uses).
    void linear_apply(int layer, int site, bf16* out, const bf16* in, int rows, bool quantize_weight,
                      bool quantize_input, bool add_bias);
    // Plans every activation for this shape (no-op when unchanged).
    void allocate(int batch, int seq_len);
    // The bytes allocate(batch, seq_len) would take for activations, without allocating.
    size_t planned_activation_bytes(int batch, int seq_len) const;
    size_t weight_bytes() const;  // fp32 master + fp32 grads + bf16 copy (+ quantized weights)
    // "weights 0.50 GB (fp32 master + grads + bf16 copy), activations 9.1 GB, logits 3.3 GB ..."
    std::string memory_report() const;
    size_t device_bytes() const;

    // Same contract as CpuModel::forward_backward: mean loss; with grad_scale != 0 the
    // gradients grad_scale * d(mean loss)/d(params) are ADDED to the gradient buffer.
    double forward_backward(const int* inputs, const int* targets, int batch, int seq_len, float grad_scale);
    double loss(const int* inputs, const int* targets, int batch, int seq_len) {
        return forward_backward(inputs, targets, batch, seq_len, 0.0f);
    }

    // The two halves, for timing (bench): forward() uploads the batch and runs through the
    // loss (and dlogits when grad_scale != 0); backward() runs the rest; mean_loss() waits.
    void forward(const int* inputs, const int* targets, int batch, int seq_len, float grad_scale);
    void backward();
    double mean_loss();
    std::vector<float> token_losses();

    struct State;  // buffers and plan (model/gpu_model.cpp); public only so its helpers can name it

private:
    size_t plan(int batch, int seq_len, bool allocate);
    void refresh_compute_weights();  // bf16 mirror <- fp32 masters
    void quantize_weights();         // quantized linear layers: their weights from the masters
    ModelConfig config_;
    ParamLayout layout_;
    std::unique_ptr<State> state_;
};

}  // namespace qopt
