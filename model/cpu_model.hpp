// The whole model on the CPU: forward, loss, and backward, composed from the reference
// kernels in kernels/. It is the ground truth for the CUDA path, so it favours plain,
// checkable code over speed. Templated on the scalar: float for training, double for the
// finite-difference gradient checks.
#pragma once
#include <vector>

#include "model/config.hpp"
#include "model/params.hpp"

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

    ModelConfig config_;
    ParamLayout layout_;
    std::vector<T> params_, grads_;
    int batch_ = 0, seq_len_ = 0;
    std::vector<LayerActs> acts_;
    std::vector<T> embedded_, output_, final_normed_, final_mean_, final_rstd_, losses_;
    std::vector<T> d_residual_, d_a_, d_b_, d_c_, d_qkv_, d_wide_, d_wide2_;
};

extern template class CpuModel<float>;
extern template class CpuModel<double>;

}  // namespace qopt
