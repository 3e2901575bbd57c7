#include "model/cpu_model.hpp"

#include <algorithm>

#include "core/error.hpp"
#include "kernels/activations.hpp"
#include "kernels/attention.hpp"
#include "kernels/classifier.hpp"
#include "kernels/embedding.hpp"
#include "kernels/matmul.hpp"
#include "kernels/norms.hpp"
#include "kernels/rope.hpp"
#include "quant/hadamard.hpp"

namespace qopt {

template <typename T>
CpuModel<T>::CpuModel(const ModelConfig& config) : config_(config), layout_(ParamLayout::build(config)) {
    params_.assign(layout_.total, T(0));
    grads_.assign(layout_.total, T(0));
}

template <typename T>
void CpuModel<T>::zero_grads() {
    std::fill(grads_.begin(), grads_.end(), T(0));
}

template <typename T>
void CpuModel<T>::set_linear_quant(const LinearQuantConfig& quant) {
    quant.validate(config_.d_model, config_.d_ff);
    quant_ = quant;
    quant_sites_.assign(quant_.enabled() ? size_t(config_.n_layers) * kSites : 0, QuantSite());
}

template <typename T>
void CpuModel<T>::linear_forward(int layer, Site site, T* out, const T* in, const T* weight, const T* bias,
                                 int n_rows, int in_dim, int out_dim) {
    if (!quant_.enabled()) {
        if (input_hook_) input_hook_(layer, site, in, n_rows, in_dim);
        return matmul_forward_cpu(out, in, weight, bias, n_rows, in_dim, out_dim);
    }
    QuantSite& q = quant_sites_[size_t(layer) * kSites + site];
    const int block = hadamard_block_for(in_dim, quant_.hadamard_block);
    const size_t n_in = size_t(n_rows) * in_dim, n_w = size_t(out_dim) * in_dim;
    q.input.assign(in, in + n_in);
    hadamard_rows_cpu(q.input.data(), n_rows, in_dim, block);
    q.input_keep.assign(n_in, 1);
    if (quant_.activations.enabled())
        fake_quant_cpu(q.input.data(), q.input_keep.data(), q.input.data(), n_rows, in_dim, quant_.activations,
                       quant_.trust);
    q.weight.assign(weight, weight + n_w);
    q.weight_keep.assign(n_w, 1);
    if (!quant_.weights_offline) {
        hadamard_rows_cpu(q.weight.data(), out_dim, in_dim, block);
        if (quant_.weights.enabled())
            fake_quant_cpu(q.weight.data(), q.weight_keep.data(), q.weight.data(), out_dim, in_dim, quant_.weights,
                           quant_.trust);
    }
    if (input_hook_) input_hook_(layer, site, q.input.data(), n_rows, in_dim);
    matmul_forward_cpu(out, q.input.data(), q.weight.data(), bias, n_rows, in_dim, out_dim);
}

template <typename T>
void CpuModel<T>::linear_apply(int layer, int site, T* out, const T* in, int rows, bool quantize_weight,
                               bool quantize_input, bool add_bias) const {
    QOPT_CHECK(!(quantize_weight || quantize_input) || !quant_.weights_offline,
               "linear_apply: quantizing needs weights quantized on the fly, not offline");
    const LinearMatrix m = linear_matrix(config_, layout_, layer, site);
    const T* bias = add_bias && m.bias != kAbsent ? params_.data() + m.bias : nullptr;
    const T* weight = params_.data() + m.offset;
    if (!quantize_weight && !quantize_input)
        return matmul_forward_cpu(out, in, weight, bias, rows, m.cols, m.rows);
    // Both operands in the rotated basis; each quantized when asked and its quantizer is on.
    const int block = hadamard_block_for(m.cols, quant_.hadamard_block);
    std::vector<T> x(in, in + size_t(rows) * m.cols), w(weight, weight + size_t(m.rows) * m.cols);
    hadamard_rows_cpu(x.data(), rows, m.cols, block);
    hadamard_rows_cpu(w.data(), m.rows, m.cols, block);
    if (quantize_input && quant_.activations.enabled())
        fake_quant_cpu(x.data(), static_cast<uint8_t*>(nullptr), x.data(), rows, m.cols, quant_.activations, quant_.trust);
    if (quantize_weight && quant_.weights.enabled())
        fake_quant_cpu(w.data(), static_cast<uint8_t*>(nullptr), w.data(), m.rows, m.cols, quant_.weights, quant_.trust);
    matmul_forward_cpu(out, x.data(), w.data(), bias, rows, m.cols, m.rows);
}

// dx = ((dout Q_w) * m_a) H and dw = ((dout^T Q_a) * m_w) H, accumulated (quant/linear_quant.hpp).
template <typename T>
void CpuModel<T>::linear_backward(int layer, Site site, T* din, T* dweight, T* dbias, const T* dout, const T* in,
                                  const T* weight, int n_rows, int in_dim, int out_dim) {
    if (!quant_.enabled()) return matmul_backward_cpu(din, dweight, dbias, dout, in, weight, n_rows, in_dim, out_dim);
    QuantSite& q = quant_sites_[size_t(layer) * kSites + site];
    const int block = hadamard_block_for(in_dim, quant_.hadamard_block);
    const size_t n_in = size_t(n_rows) * in_dim, n_w = size_t(out_dim) * in_dim;
    std::vector<T> d_input(din ? n_in : 0, T(0)), d_weight(n_w, T(0));
    matmul_backward_cpu(din ? d_input.data() : nullptr, d_weight.data(), dbias, dout, q.input.data(),
                        q.weight.data(), n_rows, in_dim, out_dim);
    if (din) {
        for (size_t i = 0; i < n_in; ++i) d_input[i] *= T(q.input_keep[i]);
        hadamard_rows_cpu(d_input.data(), n_rows, in_dim, block);
        for (size_t i = 0; i < n_in; ++i) din[i] += d_input[i];
    }
    for (size_t i = 0; i < n_w; ++i) d_weight[i] *= T(q.weight_keep[i]);
    if (!quant_.weights_offline) hadamard_rows_cpu(d_weight.data(), out_dim, in_dim, block);
    for (size_t i = 0; i < n_w; ++i) dweight[i] += d_weight[i];
}

template <typename T>
void CpuModel<T>::allocate(int batch, int seq_len) {
    if (batch == batch_ && seq_len == seq_len_) return;
    batch_ = batch;
    seq_len_ = seq_len;
    const size_t N = size_t(batch) * seq_len, C = size_t(config_.d_model), F = size_t(config_.d_ff);
    const size_t H = size_t(config_.n_heads);
    const bool gpt2 = config_.arch == Arch::Gpt2;
    acts_.assign(size_t(config_.n_layers), LayerActs());
    for (auto& a : acts_) {
        a.input.resize(N * C);
        if (gpt2) a.norm_in.resize(N * C), a.mean1.resize(N), a.rstd1.resize(N);
        a.qkv.resize(N * 3 * C);
        a.q.resize(N * C), a.k.resize(N * C), a.v.resize(N * C);
        if (!gpt2) {
            a.q_normed.resize(N * C), a.k_normed.resize(N * C), a.rstd_q.resize(N), a.rstd_k.resize(N);
            a.q_rot.resize(N * C), a.k_rot.resize(N * C);
        }
        a.probs.resize(size_t(batch) * H * seq_len * seq_len);
        a.attn.resize(N * C), a.proj.resize(N * C);
        if (!gpt2) a.proj_normed.resize(N * C), a.rstd_proj.resize(N);
        a.residual.resize(N * C);
        if (gpt2) a.mlp_in.resize(N * C), a.mean2.resize(N), a.rstd2.resize(N);
        a.up.resize(N * F), a.act.resize(N * F), a.down.resize(N * C);
        if (!gpt2) a.down_normed.resize(N * C), a.rstd_down.resize(N);
    }
    embedded_.resize(N * C);
    output_.resize(N * C);
    final_normed_.resize(N * C);
    final_mean_.resize(N);
    final_rstd_.resize(N);
    losses_.resize(N);
    d_residual_.resize(N * C), d_a_.resize(N * C), d_b_.resize(N * C), d_c_.resize(N * C);
    d_qkv_.resize(N * 3 * C), d_wide_.resize(N * F), d_wide2_.resize(N * F);
}

static void zero(std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.0f); }
static void zero(std::vector<double>& v) { std::fill(v.begin(), v.end(), 0.0); }

template <typename T>
double CpuModel<T>::forward_backward(const int* inputs, const int* targets, int batch, int seq_len, T grad_scale) {
    QOPT_CHECK(batch > 0 && seq_len > 0, "batch and sequence length must be positive");
    QOPT_CHECK(seq_len <= config_.max_seq_len, "sequence length ", seq_len, " exceeds the model's max_seq_len ",
               config_.max_seq_len);
    const size_t N = size_t(batch) * seq_len;
    check_token_ids(inputs, N, config_.vocab_size, "input");
    check_token_ids(targets, N, config_.vocab_size, "target");
    allocate(batch, seq_len);

    const int n = int(N), C = config_.d_model, F = config_.d_ff, H = config_.n_heads, hd = config_.head_dim();
    const bool gpt2 = config_.arch == Arch::Gpt2;
    const T eps = T(config_.norm_eps);
    const double theta = config_.rope_theta;
    const T* P = params_.data();
    T* G = grads_.data();
    auto p = [&](size_t offset) { return offset == kAbsent ? nullptr : P + offset; };
    auto g = [&](size_t offset) { return offset == kAbsent ? nullptr : G + offset; };

    // ---------------- forward
    embedding_forward_cpu(embedded_.data(), inputs, P + layout_.embed, p(layout_.pos_embed), n, seq_len, C);
    const T* x = embedded_.data();
    auto tap = [&](int layer, Module module, const T* out, int width) {
        if (module_hook_) module_hook_(layer, module, out, n, width);
    };
    tap(-1, Module::Embedding, x, C);
    for (int l = 0; l < config_.n_layers; ++l) {
        const LayerOffsets& o = layout_.layers[size_t(l)];
        LayerActs& a = acts_[size_t(l)];
        std::copy(x, x + N * C, a.input.begin());
        const T* attn_in = a.input.data();
        if (gpt2) {
            layernorm_forward_cpu(a.norm_in.data(), a.mean1.data(), a.rstd1.data(), a.input.data(), P + o.norm1_w,
                                  P + o.norm1_b, n, C, eps);
            attn_in = a.norm_in.data();
            tap(l, Module::AttnNorm, attn_in, C);
        }
        linear_forward(l, kQkv, a.qkv.data(), attn_in, P + o.qkv_w, p(o.qkv_b), n, C, 3 * C);
        tap(l, Module::Qkv, a.qkv.data(), 3 * C);
        for (size_t r = 0; r < N; ++r) {
            const T* row = a.qkv.data() + r * 3 * C;
            std::copy(row, row + C, a.q.data() + r * C);
            std::copy(row + C, row + 2 * C, a.k.data() + r * C);
            std::copy(row + 2 * C, row + 3 * C, a.v.data() + r * C);
        }
        const T *q = a.q.data(), *k = a.k.data();
        if (!gpt2) {
            rmsnorm_forward_cpu(a.q_normed.data(), a.rstd_q.data(), a.q.data(), P + o.q_norm_w, n, C, eps);
            rmsnorm_forward_cpu(a.k_normed.data(), a.rstd_k.data(), a.k.data(), P + o.k_norm_w, n, C, eps);
            rope_forward_cpu(a.q_rot.data(), a.q_normed.data(), n, seq_len, H, hd, theta);
            rope_forward_cpu(a.k_rot.data(), a.k_normed.data(), n, seq_len, H, hd, theta);
            q = a.q_rot.data();
            k = a.k_rot.data();
        }
        attention_forward_cpu(a.attn.data(), a.probs.data(), q, k, a.v.data(), batch, seq_len, H, hd);
        tap(l, Module::Attention, a.attn.data(), C);
        linear_forward(l, kOut, a.proj.data(), a.attn.data(), P + o.out_w, p(o.out_b), n, C, C);
        tap(l, Module::OutProj, a.proj.data(), C);
        const T* attn_branch = a.proj.data();
        if (!gpt2) {
            rmsnorm_forward_cpu(a.proj_normed.data(), a.rstd_proj.data(), a.proj.data(), P + o.norm1_w, n, C, eps);
            attn_branch = a.proj_normed.data();
            tap(l, Module::AttnNorm, attn_branch, C);
        }
        for (size_t i = 0; i < N * C; ++i) a.residual[i] = a.input[i] + attn_branch[i];
        tap(l, Module::AttnResidual, a.residual.data(), C);
        const T* mlp_in = a.residual.data();
        if (gpt2) {
            layernorm_forward_cpu(a.mlp_in.data(), a.mean2.data(), a.rstd2.data(), a.residual.data(), P + o.norm2_w,
                                  P + o.norm2_b, n, C, eps);
            mlp_in = a.mlp_in.data();
            tap(l, Module::MlpNorm, mlp_in, C);
        }
        linear_forward(l, kUp, a.up.data(), mlp_in, P + o.up_w, p(o.up_b), n, C, F);
        tap(l, Module::Up, a.up.data(), F);
        if (gpt2) gelu_forward_cpu(a.act.data(), a.up.data(), N * F);
        else relu2_forward_cpu(a.act.data(), a.up.data(), N * F);
        tap(l, Module::Activation, a.act.data(), F);
        linear_forward(l, kDown, a.down.data(), a.act.data(), P + o.down_w, p(o.down_b), n, F, C);
        tap(l, Module::Down, a.down.data(), C);
        const T* mlp_branch = a.down.data();
        if (!gpt2) {
            rmsnorm_forward_cpu(a.down_normed.data(), a.rstd_down.data(), a.down.data(), P + o.norm2_w, n, C, eps);
            mlp_branch = a.down_normed.data();
            tap(l, Module::MlpNorm, mlp_branch, C);
        }
        T* out = (l + 1 < config_.n_layers) ? acts_[size_t(l) + 1].input.data() : output_.data();
        for (size_t i = 0; i < N * C; ++i) out[i] = a.residual[i] + mlp_branch[i];
        tap(l, Module::MlpResidual, out, C);
        x = out;
    }
    if (gpt2)
        layernorm_forward_cpu(final_normed_.data(), final_mean_.data(), final_rstd_.data(), output_.data(),
                              P + layout_.final_norm_w, P + layout_.final_norm_b, n, C, eps);
    else
        rmsnorm_forward_cpu(final_normed_.data(), final_rstd_.data(), output_.data(), P + layout_.final_norm_w, n, C,
                            eps);
    tap(config_.n_layers, Module::FinalNorm, final_normed_.data(), C);

    // Loss (and, when training, dlogits -> d(final_normed) and d(embed) in the same sweep).
    const T token_scale = grad_scale / T(N);
    zero(d_a_);
    classifier_cpu(losses_.data(), d_a_.data(), G + layout_.embed, final_normed_.data(), P + layout_.embed, targets,
                   n, C, config_.vocab_size, token_scale);
    double loss_sum = 0;
    for (size_t i = 0; i < N; ++i) loss_sum += double(losses_[i]);
    const double mean_loss = loss_sum / double(N);
    if (grad_scale == T(0)) return mean_loss;

    // ---------------- backward
    // d_residual_ carries dL/d(residual stream) from the top of the network down.
    zero(d_residual_);
    if (gpt2)
        layernorm_backward_cpu(d_residual_.data(), G + layout_.final_norm_w, G + layout_.final_norm_b, d_a_.data(),
                               output_.data(), P + layout_.final_norm_w, final_mean_.data(), final_rstd_.data(), n, C);
    else
        rmsnorm_backward_cpu(d_residual_.data(), G + layout_.final_norm_w, d_a_.data(), output_.data(),
                             P + layout_.final_norm_w, final_rstd_.data(), n, C);
    for (int l = config_.n_layers - 1; l >= 0; --l) {
        const LayerOffsets& o = layout_.layers[size_t(l)];
        LayerActs& a = acts_[size_t(l)];
        // y = h + mlp_branch: d(mlp_branch) = dy, dh starts as dy (d_residual_ is kept).
        const T* d_down = d_residual_.data();
        if (!gpt2) {
            zero(d_a_);
            rmsnorm_backward_cpu(d_a_.data(), G + o.norm2_w, d_residual_.data(), a.down.data(), P + o.norm2_w,
                                 a.rstd_down.data(), n, C);
            d_down = d_a_.data();
        }
        zero(d_wide_);
        linear_backward(l, kDown, d_wide_.data(), G + o.down_w, g(o.down_b), d_down, a.act.data(), P + o.down_w, n, F, C);
        zero(d_wide2_);
        if (gpt2) gelu_backward_cpu(d_wide2_.data(), d_wide_.data(), a.up.data(), N * F);
        else relu2_backward_cpu(d_wide2_.data(), d_wide_.data(), a.up.data(), N * F);
        if (gpt2) {
            zero(d_b_);
            linear_backward(l, kUp, d_b_.data(), G + o.up_w, g(o.up_b), d_wide2_.data(), a.mlp_in.data(), P + o.up_w, n, C,
                                F);
            layernorm_backward_cpu(d_residual_.data(), G + o.norm2_w, G + o.norm2_b, d_b_.data(), a.residual.data(),
                                   P + o.norm2_w, a.mean2.data(), a.rstd2.data(), n, C);
        } else {
            linear_backward(l, kUp, d_residual_.data(), G + o.up_w, g(o.up_b), d_wide2_.data(), a.residual.data(),
                                P + o.up_w, n, C, F);
        }
        // h = x + attn_branch: d(attn_branch) = dh, dx starts as dh.
        const T* d_proj = d_residual_.data();
        if (!gpt2) {
            zero(d_a_);
            rmsnorm_backward_cpu(d_a_.data(), G + o.norm1_w, d_residual_.data(), a.proj.data(), P + o.norm1_w,
                                 a.rstd_proj.data(), n, C);
            d_proj = d_a_.data();
        }
        zero(d_b_);
        linear_backward(l, kOut, d_b_.data(), G + o.out_w, g(o.out_b), d_proj, a.attn.data(), P + o.out_w, n, C, C);
        // d_qkv_ holds [dq | dk | dv] per row; attention writes dq/dk into d_c_/d_a_ first when
        // they still have to pass through RoPE and QK-norm.
        std::vector<T> dq(N * C, T(0)), dk(N * C, T(0)), dv(N * C, T(0));
        if (gpt2) {
            attention_backward_cpu(dq.data(), dk.data(), dv.data(), d_b_.data(), a.q.data(), a.k.data(), a.v.data(),
                                   a.probs.data(), batch, seq_len, H, hd);
        } else {
            std::vector<T> dq_rot(N * C, T(0)), dk_rot(N * C, T(0)), dq_n(N * C, T(0)), dk_n(N * C, T(0));
            attention_backward_cpu(dq_rot.data(), dk_rot.data(), dv.data(), d_b_.data(), a.q_rot.data(),
                                   a.k_rot.data(), a.v.data(), a.probs.data(), batch, seq_len, H, hd);
            rope_backward_cpu(dq_n.data(), dq_rot.data(), n, seq_len, H, hd, theta);
            rope_backward_cpu(dk_n.data(), dk_rot.data(), n, seq_len, H, hd, theta);
            rmsnorm_backward_cpu(dq.data(), G + o.q_norm_w, dq_n.data(), a.q.data(), P + o.q_norm_w, a.rstd_q.data(),
                                 n, C);
            rmsnorm_backward_cpu(dk.data(), G + o.k_norm_w, dk_n.data(), a.k.data(), P + o.k_norm_w, a.rstd_k.data(),
                                 n, C);
        }
        for (size_t r = 0; r < N; ++r) {
            std::copy(dq.begin() + r * C, dq.begin() + (r + 1) * C, d_qkv_.begin() + r * 3 * C);
            std::copy(dk.begin() + r * C, dk.begin() + (r + 1) * C, d_qkv_.begin() + r * 3 * C + C);
            std::copy(dv.begin() + r * C, dv.begin() + (r + 1) * C, d_qkv_.begin() + r * 3 * C + 2 * C);
        }
        if (gpt2) {
            zero(d_c_);
            linear_backward(l, kQkv, d_c_.data(), G + o.qkv_w, g(o.qkv_b), d_qkv_.data(), a.norm_in.data(), P + o.qkv_w, n,
                                C, 3 * C);
            layernorm_backward_cpu(d_residual_.data(), G + o.norm1_w, G + o.norm1_b, d_c_.data(), a.input.data(),
                                   P + o.norm1_w, a.mean1.data(), a.rstd1.data(), n, C);
        } else {
            linear_backward(l, kQkv, d_residual_.data(), G + o.qkv_w, g(o.qkv_b), d_qkv_.data(), a.input.data(),
                                P + o.qkv_w, n, C, 3 * C);
        }
    }
    embedding_backward_cpu(G + layout_.embed, g(layout_.pos_embed), d_residual_.data(), inputs, n, seq_len, C);
    return mean_loss;
}

template class CpuModel<float>;
template class CpuModel<double>;

}  // namespace qopt
