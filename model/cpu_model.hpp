// The whole model on the CPU: forward, loss, and backward, composed from the reference
// kernels in kernels/. It is the ground truth for the CUDA path, so it favours plain,
// checkable code over speed. Templated on the scalar: float for training, double for the
// finite-difference gradient checks.
#pragma once
#include <functional>
#include <vector>

#include "model/config.hpp"
#include "model/modules.hpp"
#include "model/params.hpp"
#include "quant/linear_quant.hpp"

namespace qopt {

template <typename T>
class CpuModel {
public:
    explicit CpuModel(const ModelConfig& config);

    const ModelConfig& config() const { return config_; }
    const ParamLayout& layout() const { return layout_; }
    std::vector<T>& params() { return params_; }
    const std::vector<T>& params() const { return params_; }
    std::vector<T>& grads() { return grads_; }
    void zero_grads();

    // Mean cross-entropy of batch (B sequences of T tokens). With grad_scale != 0 it also
    // runs the backward pass and ADDS grad_scale * d(mean loss)/d(params) to grads()
    // (so gradient accumulation over micro-batches is a sum with grad_scale = 1/steps).
    // Throws qopt::Error on a token id outside the vocabulary or T above max_seq_len.
    double forward_backward(const int* inputs, const int* targets, int batch, int seq_len, T grad_scale);
    double loss(const int* inputs, const int* targets, int batch, int seq_len) {
        return forward_backward(inputs, targets, batch, seq_len, T(0));
    }
    // Per-token losses of the last call, [B*T].
    const std::vector<T>& token_losses() const { return losses_; }

    // Quantized hidden linear layers (QAT / PTQ evaluation; quant/linear_quant.hpp). Off by default.
    void set_linear_quant(const LinearQuantConfig& quant);
    const LinearQuantConfig& linear_quant() const { return quant_; }
    // Called in the forward pass with every hidden linear layer's input as the product sees it
    // (rotated and quantized when so configured): [rows, cols] for (layer, site) (LinearSite).
    // PTQ calibration collects GPTQ's Hessians through it. Empty: none.
    using InputHook = std::function<void(int layer, int site, const T* input, int rows, int cols)>;
    void set_input_hook(InputHook hook) { input_hook_ = std::move(hook); }
    // Called in the forward pass with every module's output, [rows, cols] (model/modules.hpp).
    using ModuleHook = std::function<void(int layer, Module module, const T* output, int rows, int cols)>;
    void set_module_hook(ModuleHook hook) { module_hook_ = std::move(hook); }
    // Hidden linear layer (layer, site) alone on `rows` input rows: out = in W^T (+ bias), with
    // the input and/or the weight rotated and quantized by the current linear quant (a side
    // whose quantizer is off is only rotated). Weights quantized on the fly (not offline).
    void linear_apply(int layer, int site, T* out, const T* in, int rows, bool quantize_weight,
                      bool quantize_input, bool add_bias) const;

private:
    struct LayerActs {
        std::vector<T> input, norm_in, mean1, rstd1;      // gpt2: LN before attention
        std::vector<T> qkv, q, k, v, q_normed, k_normed, rstd_q, rstd_k, q_rot, k_rot;
        std::vector<T> probs, attn, proj, proj_normed, rstd_proj;
        std::vector<T> residual;                          // h = x + attention branch
        std::vector<T> mlp_in, mean2, rstd2;              // gpt2: LN before MLP
        std::vector<T> up, act, down, down_normed, rstd_down;
    };
    void allocate(int batch, int seq_len);
    // One quantized linear layer's saved operands: the rotated, quantized input and weight
    // and their estimator masks.
    struct QuantSite {
        std::vector<T> input, weight;
        std::vector<uint8_t> input_keep, weight_keep;
    };
    enum Site { kQkv = kSiteQkv, kOut = kSiteOut, kUp = kSiteUp, kDown = kSiteDown, kSites = kLinearSites };
    // out = in W^T + b, through the quantizer when one is set; backward accumulates like
    // matmul_backward_cpu.
    void linear_forward(int layer, Site site, T* out, const T* in, const T* weight, const T* bias, int n_rows,
                        int in_dim, int out_dim);
    void linear_backward(int layer, Site site, T* din, T* dweight, T* dbias, const T* dout, const T* in,
                         const T* weight, int n_rows, int in_dim, int out_dim);

    ModelConfig config_;
    ParamLayout layout_;
    std::vector<T> params_, grads_;
    int batch_ = 0, seq_len_ = 0;
    std::vector<LayerActs> acts_;
    std::vector<T> embedded_, output_, final_normed_, final_mean_, final_rstd_, losses_;
    std::vector<T> d_residual_, d_a_, d_b_, d_c_, d_qkv_, d_wide_, d_wide2_;
    LinearQuantConfig quant_;
    std::vector<QuantSite> quant_sites_;  // [n_layers * kSites] when quantized
    InputHook input_hook_;
    ModuleHook module_hook_;
};

extern template class CpuModel<float>;
extern template class CpuModel<double>;

}  // namespace qopt
