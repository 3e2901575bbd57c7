#include "model/gpu_model.hpp"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>

#include "core/error.hpp"
#include "kernels/cuda_common.cuh"
#include "kernels/device.hpp"
#include "kernels/gpu.hpp"
#include "kernels/rope.hpp"
#include "quant/hadamard.hpp"
#include "quant/int8_linear.hpp"
#include "quant/integer_execution.hpp"
#include "quant/w4a16_linear.hpp"
#include "quant/quant_gpu.hpp"

namespace qopt {


// Activations of one transformer block (bf16 unless marked fp32). Which exist depends on
// the layout: olmo2 normalises q/k (QK-norm), rotates them (RoPE) and normalises each
// sublayer's output; gpt2 normalises each sublayer's input (LayerNorm).
struct LayerActivations {
    DeviceBuffer<bf16> qkv, attn, h, up, act;  // both layouts (act empty when recomputed)
    DeviceBuffer<float> lse;                   // attention log-sum-exp [B, H, T]
    // olmo2
    DeviceBuffer<bf16> q_rot, k_rot, proj, down;
    DeviceBuffer<float> rstd_q, rstd_k, rstd_proj, rstd_down;
    // gpt2
    DeviceBuffer<bf16> ln1, ln2;
    DeviceBuffer<float> mean1, rstd1, mean2, rstd2;
};

// A quantized linear layer's operands as the product sees them (rotated, fake-quantized) and
// the estimator's masks (empty when that side is not quantized).
struct QuantSite {
    DeviceBuffer<bf16> input, weight;
    DeviceBuffer<uint32_t> input_keep, weight_keep;  // bit masks (quant/quant_gpu.hpp)
};
struct IntegerSite {  // one hidden matrix in integers: int8 codes [rows, cols] + steps [rows], or packed
    DeviceBuffer<int8_t> codes;
    DeviceBuffer<uint8_t> fp8_codes;  // the same codes as e4m3 bytes, where the formats allow (<= 5 bits)
    DeviceBuffer<float> steps;
    DevicePackedWeights packed;
};
enum Site { kQkv = kSiteQkv, kOut = kSiteOut, kUp = kSiteUp, kDown = kSiteDown, kSites = kLinearSites };

struct GpuModel::State {
    DeviceBuffer<float> params, grads;
    DeviceBuffer<bf16> weights;  // bf16 mirror of params
    DeviceBuffer<float> rope_cos, rope_sin;
    int batch = 0, seq_len = 0;
    float grad_scale = 0;  // of the last forward()
    std::vector<LayerActivations> layers;
    std::vector<IntegerSite> integer_sites;  // non-empty: the hidden linear layers run in integers
    IntegerPath integer_path = IntegerPath::Int8Product;
    Int8LinearScratch integer_scratch;
    std::vector<DeviceBuffer<bf16>> residual;  // residual[l]: input of block l; residual[L]: output
    DeviceBuffer<bf16> final_normed, logits, branch;
    bool recompute = false;
    DeviceBuffer<bf16> act_scratch;  // with recompute: the one MLP activation buffer all blocks share
    DeviceBuffer<float> final_mean, final_rstd, losses;
    DeviceBuffer<int> inputs, targets, bucket_tokens, bucket_offsets, bucket_positions;
    std::vector<int> host_inputs;
    // backward scratch
    DeviceBuffer<bf16> d_residual, d_a, d_b, d_q, d_k, d_qkv, d_wide, d_wide2;
    DeviceBuffer<float> delta;
    size_t activation_bytes = 0;
    // Quantized linear layers
    LinearQuantConfig quant;
    std::vector<QuantSite> quant_sites;     // [n_layers * kSites]
    QuantSite shared_down;                  // with recompute: the one MLP-down input all blocks share
    DeviceBuffer<bf16> quant_d_input;       // d(quantized input) before the mask and rotation
    DeviceBuffer<float> quant_d_weight;     // d(quantized weight), likewise
    DeviceBuffer<double> quant_stats;       // per-tensor statistics scratch
    size_t quant_weight_bytes = 0;
    GpuModel::InputHook input_hook;
    GpuModel::ModuleHook module_hook;
    GpuModel::GradientsReadyHook gradients_ready;
    DeviceBuffer<bf16> tap_norm, apply_input;  // module-hook norm outputs; linear_apply's rotated input
    DeviceBuffer<float> tap_rstd;
};

GpuModel::GpuModel(const ModelConfig& config)
    : config_(config), layout_(ParamLayout::build(config)), state_(std::make_unique<State>()) {
    config_.validate();
    const std::string problem = unsupported_reason(config_);
    if (!problem.empty()) fail("--device cuda: ", problem);
    const int hd = config_.head_dim();
    State& s = *state_;
    s.params.resize(layout_.total);
    s.grads.resize(layout_.total);
    s.weights.resize(layout_.total);
    if (config_.arch == Arch::Olmo2) {
        std::vector<float> cos_table(size_t(config_.max_seq_len) * hd / 2), sin_table(cos_table.size());
        rope_angles(cos_table.data(), sin_table.data(), config_.max_seq_len, hd, config_.rope_theta);
        s.rope_cos.upload(cos_table);
        s.rope_sin.upload(sin_table);
    }
    zero_grads();
}

GpuModel::~GpuModel() = default;

std::string GpuModel::unsupported_reason(const ModelConfig& config) {
    const int hd = config.head_dim();
    if (hd != 16 && hd != 32 && hd != 64 && hd != 128)
        return "head_dim " + std::to_string(hd) +
               " (d_model / n_heads) is not supported by the attention kernels (16, 32, 64 or 128)";
    if (config.d_model % 8 != 0 || config.d_ff % 8 != 0 || config.padded_vocab_size % 8 != 0)
        return "d_model, d_ff and padded_vocab_size must be multiples of 8 for the GPU kernels' aligned loads";
    return "";
}

void GpuModel::upload_params(const std::vector<float>& host) {
    QOPT_CHECK(host.size() == layout_.total, "upload_params: ", host.size(), " values for ", layout_.total,
               " parameters");
    state_->params.upload(host);
    refresh_compute_weights();
}

std::vector<float> GpuModel::download_params() const { return state_->params.download(); }
std::vector<float> GpuModel::download_grads() const { return state_->grads.download(); }
float* GpuModel::params_device() { return state_->params.data(); }
float* GpuModel::grads_device() { return state_->grads.data(); }
bf16* GpuModel::compute_weights_device() { return state_->weights.data(); }

void GpuModel::refresh_compute_weights() {
    to_bf16_gpu(state_->weights.data(), state_->params.data(), layout_.total);
}

void GpuModel::zero_grads() { state_->grads.fill_bytes(0); }

void GpuModel::allocate(int batch, int seq_len) {
    State& s = *state_;
    if (batch == s.batch && seq_len == s.seq_len) return;
    s.activation_bytes = plan(batch, seq_len, true);
    s.batch = batch;
    s.seq_len = seq_len;
}

size_t GpuModel::planned_activation_bytes(int batch, int seq_len) const {
    return const_cast<GpuModel*>(this)->plan(batch, seq_len, false);
}

// The activation plan for (batch, seq_len): every buffer's size, allocated when `allocate`,
// else only counted (planned_activation_bytes: the same code, so the estimate is exact).
size_t GpuModel::plan(int batch, int seq_len, bool allocate) {
    State& s = *state_;
    QOPT_CHECK(batch > 0 && seq_len > 0, "batch and sequence length must be positive");
    QOPT_CHECK(seq_len <= config_.max_seq_len, "sequence length ", seq_len, " exceeds the model's max_seq_len ",
               config_.max_seq_len);
    const size_t N = size_t(batch) * seq_len, C = size_t(config_.d_model), F = size_t(config_.d_ff);
    const size_t BHT = size_t(batch) * config_.n_heads * seq_len;
    const bool gpt2 = config_.arch == Arch::Gpt2;
    size_t bytes = 0;
    auto sized = [&](auto& buffer, size_t n) {
        if (allocate) buffer.resize(n);
        bytes += n * sizeof(*buffer.data());
    };
    auto bf = [&](DeviceBuffer<bf16>& buffer, size_t n) { sized(buffer, n); };
    auto fp = [&](DeviceBuffer<float>& buffer, size_t n) { sized(buffer, n); };
    // Counting only: stand-in buffers (never allocated) for the per-layer lists.
    std::vector<LayerActivations> counted_layers;
    std::vector<DeviceBuffer<bf16>> counted_residual;
    auto& layers = allocate ? s.layers : counted_layers;
    auto& residual = allocate ? s.residual : counted_residual;
    layers.clear();
    layers.resize(size_t(config_.n_layers));
    for (auto& a : layers) {
        bf(a.qkv, N * 3 * C), bf(a.attn, N * C), bf(a.h, N * C), bf(a.up, N * F);
        if (!s.recompute && !s.quant.enabled()) bf(a.act, N * F);
        fp(a.lse, BHT);
        if (gpt2) {
            bf(a.ln1, N * C), bf(a.ln2, N * C);
            fp(a.mean1, N), fp(a.rstd1, N), fp(a.mean2, N), fp(a.rstd2, N);
        } else {
            bf(a.q_rot, N * C), bf(a.k_rot, N * C), bf(a.proj, N * C), bf(a.down, N * C);
            fp(a.rstd_q, N), fp(a.rstd_k, N), fp(a.rstd_proj, N), fp(a.rstd_down, N);
        }
    }
    if (s.recompute && !s.quant.enabled()) bf(s.act_scratch, N * F);
    residual.clear();
    residual.resize(size_t(config_.n_layers) + 1);
    for (auto& r : residual) bf(r, N * C);
    bf(s.final_normed, N * C), bf(s.branch, N * C);
    bf(s.logits, N * size_t(config_.padded_vocab_size));
    fp(s.final_mean, N), fp(s.final_rstd, N), fp(s.losses, N);
    sized(s.inputs, N), sized(s.targets, N);
    sized(s.bucket_tokens, N), sized(s.bucket_offsets, N + 1), sized(s.bucket_positions, N);
    bf(s.d_residual, N * C), bf(s.d_a, N * C), bf(s.d_b, N * C), bf(s.d_qkv, N * 3 * C);
    bf(s.d_wide, N * F), bf(s.d_wide2, N * F);
    if (!gpt2) bf(s.d_q, N * C), bf(s.d_k, N * C);
    fp(s.delta, BHT);
    if (s.quant.enabled()) {
        auto mask = [&](DeviceBuffer<uint32_t>& buffer, size_t n) { sized(buffer, keep_mask_words(n)); };
        const bool act_masks = s.quant.activations.enabled();
        for (int l = 0; l < config_.n_layers; ++l)
            for (int site = 0; site < kSites; ++site) {
                QuantSite& q = s.quant_sites[size_t(l) * kSites + site];
                const size_t in_dim = site == kDown ? F : C;
                if (site == kDown && s.recompute) continue;
                bf(q.input, N * in_dim);
                if (act_masks) mask(q.input_keep, N * in_dim);
            }
        if (s.recompute) {
            bf(s.shared_down.input, N * F);
            if (act_masks) mask(s.shared_down.input_keep, N * F);
        }
        bf(s.quant_d_input, N * F);
        fp(s.quant_d_weight, std::max(3 * C * C, F * C));
        sized(s.quant_stats, (std::max(N, 3 * C + F) + 1) * 4);
    }
    return bytes;
}

size_t GpuModel::weight_bytes() const {
    return layout_.total * (2 * sizeof(float) + sizeof(bf16)) + state_->quant_weight_bytes;
}

size_t GpuModel::device_bytes() const { return weight_bytes() + state_->activation_bytes; }

std::string GpuModel::memory_report() const {
    const size_t weight_bytes = layout_.total * (2 * sizeof(float) + sizeof(bf16));
    const size_t logit_bytes = size_t(state_->batch) * state_->seq_len * config_.padded_vocab_size * sizeof(bf16);
    return "weights " + gigabytes(weight_bytes) + " (fp32 master + fp32 grads + bf16 copy), activations " +
           gigabytes(state_->activation_bytes - logit_bytes) + " + logits " + gigabytes(logit_bytes) + " for " +
           std::to_string(state_->batch) + " x " + std::to_string(state_->seq_len) + " tokens" +
           (state_->quant.enabled() ? ", quantized weights and masks " + gigabytes(state_->quant_weight_bytes) +
                                          " (inputs and masks counted in activations)"
                                    : "");
}

namespace {

struct LinearOperands {
    const bf16* input;
    const bf16* weight;
};

// The rotated, fake-quantized copy of `in` (or the weight) that the product uses.
void quantize_rows(const LinearQuantConfig& quant, bf16* out, uint32_t* keep, const bf16* in, long rows, int cols,
                   const QuantSpec& spec, double* stats) {
    const int block = hadamard_block_for(cols, quant.hadamard_block);
    if (spec.enabled())
        rotate_fake_quant_rows_gpu(out, keep, in, rows, cols, block, spec, quant.trust, stats);
    else if (block > 1)  // rotated only: one out-of-place pass (no mask: every element passes)
        masked_hadamard_rows_gpu(out, in, nullptr, rows, cols, block, /*accumulate=*/false);
    else
        CUDA_CHECK(cudaMemcpyAsync(out, in, size_t(rows) * cols * sizeof(bf16), cudaMemcpyDeviceToDevice));
}

// Where layer l's quantized input for `site` lives (with recompute, the MLP-down inputs of all
// blocks share one buffer and are recomputed in the backward pass).
QuantSite& input_site(GpuModel::State& s, int layer, Site site) {
    return site == kDown && s.recompute ? s.shared_down : s.quant_sites[size_t(layer) * kSites + site];
}

// The product's operands for layer l's `site`: rotated and quantized input and weight when the
// layers are quantized, else the input and the bf16 weight as they are.
// A quantized site's operands once its input is in the site's buffer: that input and the
// weight the product uses (the offline-quantized bf16 copy, or this forward's quantized copy).
LinearOperands quantized_operands(GpuModel::State& s, const bf16* weights, int layer, Site site,
                                  size_t weight_offset, int n_rows, int in_dim) {
    const QuantSite& q = input_site(s, layer, site);
    const bf16* weight = s.quant.weights_offline ? weights + weight_offset
                                                 : s.quant_sites[size_t(layer) * kSites + site].weight.data();
    if (s.input_hook) s.input_hook(layer, site, q.input.data(), n_rows, in_dim);
    return {q.input.data(), weight};
}

LinearOperands linear_operands(GpuModel::State& s, const bf16* weights, int layer, Site site, const bf16* in,
                               size_t weight_offset, int n_rows, int in_dim) {
    if (!s.quant.enabled()) {
        if (s.input_hook) s.input_hook(layer, site, in, n_rows, in_dim);
        return {in, weights + weight_offset};
    }
    QuantSite& q = input_site(s, layer, site);
    quantize_rows(s.quant, q.input.data(), q.input_keep.data(), in, n_rows, in_dim, s.quant.activations,
                  s.quant_stats.data());
    return quantized_operands(s, weights, layer, site, weight_offset, n_rows, in_dim);
}

// The same for the MLP down projection of quantized layers, its input act(pre_activation)
// computed in the quantizing pass (act itself is never stored).
LinearOperands activation_operands(GpuModel::State& s, const bf16* weights, int layer, const bf16* pre_activation,
                                   MlpActivation activation, size_t weight_offset, int n_rows, int in_dim) {
    QuantSite& q = input_site(s, layer, kDown);
    const int block = hadamard_block_for(in_dim, s.quant.hadamard_block);
    if (s.quant.activations.enabled()) {
        activation_fake_quant_rows_gpu(q.input.data(), q.input_keep.data(), pre_activation, activation, n_rows, in_dim,
                                       block, s.quant.activations, s.quant.trust, s.quant_stats.data());
    } else {
        activation_forward_gpu(q.input.data(), pre_activation, activation, size_t(n_rows) * in_dim);
        hadamard_rows_gpu(q.input.data(), n_rows, in_dim, block);
    }
    return quantized_operands(s, weights, layer, kDown, weight_offset, n_rows, in_dim);
}

}  // namespace

void GpuModel::set_linear_quant(const LinearQuantConfig& quant) {
    quant.validate(config_.d_model, config_.d_ff);
    State& s = *state_;
    s.quant = quant;
    s.quant_sites.clear();
    s.integer_sites.clear();  // integer weights belong to the previous configuration
    s.quant_weight_bytes = 0;
    if (quant.enabled()) {
        s.quant_sites.resize(size_t(config_.n_layers) * kSites);
        const size_t C = size_t(config_.d_model), F = size_t(config_.d_ff);
        const size_t weight_sizes[kSites] = {3 * C * C, C * C, F * C, C * F};
        for (size_t i = 0; i < s.quant_sites.size() && !quant.weights_offline; ++i) {
            // (offline weights: the bf16 copy is used as it is)
            QuantSite& site = s.quant_sites[i];
            const size_t n = weight_sizes[i % kSites];
            site.weight.resize(n), s.quant_weight_bytes += n * sizeof(bf16);
            if (quant.weights.enabled())
                site.weight_keep.resize(keep_mask_words(n)), s.quant_weight_bytes += keep_mask_words(n) * sizeof(uint32_t);
        }
    }
    s.batch = s.seq_len = 0;  // re-plan the activations on the next allocate()
}

void GpuModel::set_integer_weights(const std::vector<QuantizedTensor>& per_matrix) {
    State& s = *state_;
    s.integer_sites.clear();
    if (per_matrix.empty()) return;
    QOPT_CHECK(s.quant.enabled() && s.quant.weights_offline,
               "integer execution needs a quantized configuration with offline weights");
    s.integer_path = integer_path(s.quant);
    const std::vector<LinearMatrix> matrices = linear_matrices(config_, layout_);
    QOPT_CHECK(per_matrix.size() == matrices.size(), "integer execution: ", per_matrix.size(), " weights for ",
               matrices.size(), " hidden matrices");
    std::vector<IntegerSite> sites(size_t(config_.n_layers) * kSites);
    for (size_t i = 0; i < matrices.size(); ++i) {
        const LinearMatrix& m = matrices[i];
        const QuantizedTensor& w = per_matrix[i];
        QOPT_CHECK(w.rows == m.rows && w.cols == m.cols && w.codes.size() == size_t(m.rows) * m.cols,
                   "integer execution: ", m.name, " needs ", m.rows, " x ", m.cols, " codes");
        IntegerSite& site = sites[size_t(m.layer) * kSites + m.site];
        if (s.integer_path == IntegerPath::PackedWeights) {
            site.packed.upload(pack_weights(w));
            continue;
        }
        QOPT_CHECK(m.rows % 4 == 0 && m.cols % 4 == 0, "integer execution: ", m.name, " is ", m.rows, " x ", m.cols,
                   "; the int8 product needs multiples of 4");
        const IntegerMatrix codes = integer_matrix(w);
        site.codes.upload(codes.codes);
        site.steps.upload(codes.steps);
        // Weights and activations of at most 5 bits: fp8 tensor cores, scales in the epilogue.
        if (fp8_exact(w.spec) && fp8_exact(s.quant.activations) && m.rows % 16 == 0 && m.cols % 16 == 0)
            site.fp8_codes.upload(fp8_codes(codes.codes));
    }
    s.integer_sites = std::move(sites);
}

const LinearQuantConfig& GpuModel::linear_quant() const { return state_->quant; }
void GpuModel::set_input_hook(InputHook hook) { state_->input_hook = std::move(hook); }
void GpuModel::set_module_hook(ModuleHook hook) { state_->module_hook = std::move(hook); }
void GpuModel::set_gradients_ready_hook(GradientsReadyHook hook) { state_->gradients_ready = std::move(hook); }

void GpuModel::linear_apply(int layer, int site, bf16* out, const bf16* in, int rows, bool quantize_weight,
                            bool quantize_input, bool add_bias) {
    State& s = *state_;
    QOPT_CHECK(rows > 0 && rows <= s.batch * s.seq_len, "linear_apply: ", rows, " rows, planned ", s.batch * s.seq_len);
    const bool quantized = quantize_weight || quantize_input;
    QOPT_CHECK(!quantized || (s.quant.enabled() && !s.quant.weights_offline),
               "linear_apply: quantizing needs a quantized forward with weights quantized on the fly");
    const LinearMatrix m = linear_matrix(config_, layout_, layer, site);
    const bf16* bias = add_bias && m.bias != kAbsent ? s.weights.data() + m.bias : nullptr;
    if (!quantized) return matmul_forward_gpu(out, in, s.weights.data() + m.offset, bias, rows, m.cols, m.rows);
    // Rotated operands; the weight's quantized copy is the forward's (only rotated when its
    // quantizer is off), an unquantized weight is rotated here into the same scratch.
    const size_t input_size = size_t(rows) * m.cols, weight_size = size_t(m.rows) * m.cols;
    if (s.apply_input.size() < input_size + weight_size) s.apply_input.resize(input_size + weight_size);
    bf16* x = s.apply_input.data();
    QuantSpec off;
    off.bits = 16;
    quantize_rows(s.quant, x, nullptr, in, rows, m.cols, quantize_input ? s.quant.activations : off,
                  s.quant_stats.data());
    const bf16* weight = s.quant_sites[size_t(layer) * kSites + size_t(site)].weight.data();
    if (!quantize_weight && s.quant.weights.enabled()) {
        bf16* rotated = x + input_size;
        quantize_rows(s.quant, rotated, nullptr, s.weights.data() + m.offset, m.rows, m.cols, off, nullptr);
        weight = rotated;
    }
    matmul_forward_gpu(out, x, weight, bias, rows, m.cols, m.rows);
}

// Every hidden matrix, rotated and fake-quantized from the fp32 masters (QAT), once per forward.
void GpuModel::quantize_weights() {
    State& s = *state_;
    for (const LinearMatrix& m : linear_matrices(config_, layout_)) {
        QuantSite& q = s.quant_sites[size_t(m.layer) * kSites + m.site];
        if (s.quant.weights.enabled())
            rotate_fake_quant_rows_gpu(q.weight.data(), q.weight_keep.data(), s.params.data() + m.offset, m.rows,
                                       m.cols, hadamard_block_for(m.cols, s.quant.hadamard_block), s.quant.weights,
                                       s.quant.trust, s.quant_stats.data());
        else
            quantize_rows(s.quant, q.weight.data(), nullptr, s.weights.data() + m.offset, m.rows, m.cols,
                          s.quant.weights, nullptr);
    }
}


void GpuModel::set_recompute(bool recompute) {
    if (recompute == state_->recompute) return;
    state_->recompute = recompute;
    state_->batch = state_->seq_len = 0;  // re-plan on the next allocate()
}

bool GpuModel::recompute() const { return state_->recompute; }

// Where block l's MLP activation lives: its own buffer, or the shared one when recomputed.
static bf16* activation_buffer(LayerActivations& a, DeviceBuffer<bf16>& shared, bool recompute) {
    return recompute ? shared.data() : a.act.data();
}

void GpuModel::forward(const int* inputs, const int* targets, int batch, int seq_len, float grad_scale) {
    allocate(batch, seq_len);
    State& s = *state_;
    const int N = batch * seq_len, C = config_.d_model, F = config_.d_ff, H = config_.n_heads;
    const int hd = config_.head_dim(), T = seq_len, V = config_.vocab_size, Vp = config_.padded_vocab_size;
    const bool gpt2 = config_.arch == Arch::Gpt2;
    const float eps = config_.norm_eps;
    check_token_ids(inputs, size_t(N), V, "input");
    check_token_ids(targets, size_t(N), V, "target");
    s.host_inputs.assign(inputs, inputs + N);
    CUDA_CHECK(cudaMemcpy(s.inputs.data(), inputs, size_t(N) * sizeof(int), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(s.targets.data(), targets, size_t(N) * sizeof(int), cudaMemcpyHostToDevice));
    s.grad_scale = grad_scale;

    const float* P = s.params.data();
    const bf16* W = s.weights.data();
    auto w = [&](size_t offset) { return offset == kAbsent ? nullptr : W + offset; };
    if (s.quant.enabled() && !s.quant.weights_offline) quantize_weights();
    auto operands = [&](int l, Site site, const bf16* in, size_t weight_offset, int in_dim) {
        return linear_operands(s, W, l, site, in, weight_offset, N, in_dim);
    };
    // A hidden linear layer: in integers when set (the input rotated into the site's buffer
    // first), else the (fake-quantized or plain) bf16 product.
    const bool integer = !s.integer_sites.empty();
    QOPT_CHECK(!integer || grad_scale == 0.0f, "integer execution is forward only (no gradients)");
    QOPT_CHECK(!integer || s.integer_path != IntegerPath::Int8Product || N % 4 == 0, "integer execution: ", N,
               " tokens per batch; the int8 product needs a multiple of 4");
    auto linear = [&](int l, Site site, bf16* out, const bf16* in, size_t weight_offset, size_t bias_offset, int in_dim,
                      int out_dim) {
        if (!integer) {
            const LinearOperands x = operands(l, site, in, weight_offset, in_dim);
            return matmul_forward_gpu(out, x.input, x.weight, w(bias_offset), N, in_dim, out_dim);
        }
        const int block = hadamard_block_for(in_dim, s.quant.hadamard_block);
        const IntegerSite& weight = s.integer_sites[size_t(l) * kSites + site];
        const float* bias = bias_offset == kAbsent ? nullptr : P + bias_offset;
        if (s.integer_path == IntegerPath::PackedWeights) {
            if (block > 0) {  // rotated only (an off spec), then the packed product on bf16 inputs
                bf16* rotated = input_site(s, l, site).input.data();
                quantize_rows(s.quant, rotated, nullptr, in, N, in_dim, QuantSpec{}, nullptr);
                in = rotated;
            }
            return w4a16_linear_forward_gpu(out, in, weight.packed, bias, N);
        }
        // The integer layers rotate and quantize their input themselves (one pass where they can).
        if (weight.fp8_codes.size() && N % 16 == 0)
            return fp8_linear_forward_gpu(out, in, weight.fp8_codes.data(), weight.steps.data(), w(bias_offset), N,
                                          in_dim, out_dim, s.quant.activations, block, s.integer_scratch);
        int8_linear_forward_gpu(out, in, weight.codes.data(), weight.steps.data(), bias, N, in_dim, out_dim,
                                s.quant.activations, block, s.integer_scratch);
    };
    // Quantized layers (not in integers) never store the MLP activation: the down projection's
    // input is quantized straight from the pre-activation. The activation is then written only
    // for the module hook or the integer path, into d_wide (a backward buffer, free here).
    const bool fused_activation = s.quant.enabled() && !integer;
    auto forward_activation_buffer = [&](int l) {
        return s.quant.enabled() ? s.d_wide.data() : activation_buffer(s.layers[size_t(l)], s.act_scratch, s.recompute);
    };
    auto down = [&](int l, bf16* out, const bf16* act, MlpActivation activation, size_t weight_offset,
                    size_t bias_offset) {
        if (!fused_activation) return linear(l, kDown, out, act, weight_offset, bias_offset, F, C);
        const LinearOperands x =
            activation_operands(s, W, l, s.layers[size_t(l)].up.data(), activation, weight_offset, N, F);
        matmul_forward_gpu(out, x.input, x.weight, w(bias_offset), N, F, C);
    };
    embedding_forward_gpu(s.residual[0].data(), s.inputs.data(), W + layout_.embed, w(layout_.pos_embed), N, T, C);
    auto tap = [&](int layer, Module module, const bf16* out, int width) {
        if (s.module_hook) s.module_hook(layer, module, out, N, width);
    };
    // olmo2's post-sublayer norm, fused with the residual add in the forward, written out for the hook.
    auto tap_norm = [&](int layer, Module module, const bf16* branch, size_t norm_w) {
        if (!s.module_hook) return;
        if (s.tap_norm.size() < size_t(N) * C) s.tap_norm.resize(size_t(N) * C), s.tap_rstd.resize(size_t(N));
        rmsnorm_forward_gpu(s.tap_norm.data(), s.tap_rstd.data(), branch, P + norm_w, N, C, eps);
        tap(layer, module, s.tap_norm.data(), C);
    };
    tap(-1, Module::Embedding, s.residual[0].data(), C);
    if (gpt2) {  // later LN1s are fused with the residual add that ends the previous block
        const LayerOffsets& o = layout_.layers[0];
        LayerActivations& a = s.layers[0];
        layernorm_forward_gpu(a.ln1.data(), a.mean1.data(), a.rstd1.data(), s.residual[0].data(), P + o.norm1_w,
                              P + o.norm1_b, N, C, eps);
    }
    for (int l = 0; l < config_.n_layers; ++l) {
        const LayerOffsets& o = layout_.layers[size_t(l)];
        LayerActivations& a = s.layers[size_t(l)];
        const bf16* x = s.residual[size_t(l)].data();
        bf16* y = s.residual[size_t(l) + 1].data();
        bf16* qkv = a.qkv.data();
        if (gpt2) {
            tap(l, Module::AttnNorm, a.ln1.data(), C);
            linear(l, kQkv, qkv, a.ln1.data(), o.qkv_w, o.qkv_b, C, 3 * C);
            tap(l, Module::Qkv, qkv, 3 * C);
            attention_forward_gpu({a.attn.data(), C}, a.lse.data(), {qkv, 3 * C}, {qkv + C, 3 * C},
                                  {qkv + 2 * C, 3 * C}, batch, T, H, hd);
            tap(l, Module::Attention, a.attn.data(), C);
            linear(l, kOut, s.branch.data(), a.attn.data(), o.out_w, o.out_b, C, C);
            tap(l, Module::OutProj, s.branch.data(), C);
            add_layernorm_forward_gpu(a.h.data(), a.ln2.data(), a.mean2.data(), a.rstd2.data(), x, s.branch.data(),
                                      P + o.norm2_w, P + o.norm2_b, N, C, eps);
            tap(l, Module::AttnResidual, a.h.data(), C);
            tap(l, Module::MlpNorm, a.ln2.data(), C);
            bf16* act = forward_activation_buffer(l);
            if (integer || fused_activation) {  // GELU only where its output is read (as OLMo2's ReLU^2)
                linear(l, kUp, a.up.data(), a.ln2.data(), o.up_w, o.up_b, C, F);
                if (!fused_activation || s.module_hook) gelu_forward_gpu(act, a.up.data(), size_t(N) * F);
            } else {
                const LinearOperands up_in = operands(l, kUp, a.ln2.data(), o.up_w, C);
                matmul_forward_gelu_gpu(act, a.up.data(), up_in.input, up_in.weight, w(o.up_b), N, C, F);
            }
            tap(l, Module::Up, a.up.data(), F);
            tap(l, Module::Activation, act, F);
            down(l, s.branch.data(), act, MlpActivation::Gelu, o.down_w, o.down_b);
            tap(l, Module::Down, s.branch.data(), C);
            // y = h + branch, normalised by the next block's LN1 (or the final LN) in the same pass.
            if (l + 1 < config_.n_layers) {
                const LayerOffsets& next = layout_.layers[size_t(l) + 1];
                LayerActivations& na = s.layers[size_t(l) + 1];
                add_layernorm_forward_gpu(y, na.ln1.data(), na.mean1.data(), na.rstd1.data(), a.h.data(),
                                          s.branch.data(), P + next.norm1_w, P + next.norm1_b, N, C, eps);
            } else {
                add_layernorm_forward_gpu(y, s.final_normed.data(), s.final_mean.data(), s.final_rstd.data(),
                                          a.h.data(), s.branch.data(), P + layout_.final_norm_w,
                                          P + layout_.final_norm_b, N, C, eps);
            }
            tap(l, Module::MlpResidual, y, C);
        } else {
            linear(l, kQkv, qkv, x, o.qkv_w, kAbsent, C, 3 * C);
            tap(l, Module::Qkv, qkv, 3 * C);
            // QK-norm over the full q / k projections, then RoPE in place.
            rmsnorm_forward_gpu({a.q_rot.data(), C}, a.rstd_q.data(), {qkv, 3 * C}, P + o.q_norm_w, N, C, eps);
            rmsnorm_forward_gpu({a.k_rot.data(), C}, a.rstd_k.data(), {qkv + C, 3 * C}, P + o.k_norm_w, N, C, eps);
            rope_forward_gpu(a.q_rot.data(), a.q_rot.data(), s.rope_cos.data(), s.rope_sin.data(), N, T, H, hd);
            rope_forward_gpu(a.k_rot.data(), a.k_rot.data(), s.rope_cos.data(), s.rope_sin.data(), N, T, H, hd);
            attention_forward_gpu({a.attn.data(), C}, a.lse.data(), {a.q_rot.data(), C}, {a.k_rot.data(), C},
                                  {qkv + 2 * C, 3 * C}, batch, T, H, hd);
            tap(l, Module::Attention, a.attn.data(), C);
            linear(l, kOut, a.proj.data(), a.attn.data(), o.out_w, kAbsent, C, C);
            tap(l, Module::OutProj, a.proj.data(), C);
            tap_norm(l, Module::AttnNorm, a.proj.data(), o.norm1_w);
            rmsnorm_add_forward_gpu(a.h.data(), a.rstd_proj.data(), x, a.proj.data(), P + o.norm1_w, N, C, eps);
            tap(l, Module::AttnResidual, a.h.data(), C);
            linear(l, kUp, a.up.data(), a.h.data(), o.up_w, kAbsent, C, F);
            tap(l, Module::Up, a.up.data(), F);
            bf16* act = forward_activation_buffer(l);
            if (!fused_activation || s.module_hook) relu2_forward_gpu(act, a.up.data(), size_t(N) * F);
            tap(l, Module::Activation, act, F);
            down(l, a.down.data(), act, MlpActivation::Relu2, o.down_w, kAbsent);
            tap(l, Module::Down, a.down.data(), C);
            tap_norm(l, Module::MlpNorm, a.down.data(), o.norm2_w);
            rmsnorm_add_forward_gpu(y, a.rstd_down.data(), a.h.data(), a.down.data(), P + o.norm2_w, N, C, eps);
            tap(l, Module::MlpResidual, y, C);
        }
    }
    if (!gpt2)
        rmsnorm_forward_gpu(s.final_normed.data(), s.final_rstd.data(), s.residual.back().data(),
                            P + layout_.final_norm_w, N, C, eps);
    tap(config_.n_layers, Module::FinalNorm, s.final_normed.data(), C);
    // Tied head: logits = x E^T over the padded vocabulary; the fused kernel turns them into
    // losses and (when training) dlogits in place.
    matmul_forward_gpu(s.logits.data(), s.final_normed.data(), W + layout_.embed, nullptr, N, C, Vp);
    softmax_cross_entropy_gpu(s.losses.data(), s.logits.data(), s.targets.data(), N, V, Vp, grad_scale / float(N));
}

void GpuModel::backward() {
    State& s = *state_;
    QOPT_CHECK(s.grad_scale != 0.0f, "backward() needs a forward() with a non-zero grad_scale");
    const int batch = s.batch, T = s.seq_len, N = batch * T, C = config_.d_model, F = config_.d_ff;
    const int H = config_.n_heads, hd = config_.head_dim(), Vp = config_.padded_vocab_size;
    const bool gpt2 = config_.arch == Arch::Gpt2;
    const float* P = s.params.data();
    const bf16* W = s.weights.data();
    float* G = s.grads.data();
    bf16 *d_res = s.d_residual.data(), *d_a = s.d_a.data(), *d_b = s.d_b.data();
    const bool quantized = s.quant.enabled();
    // A linear layer's input and weight gradients (din written, or added with accumulate; the
    // weight gradient added), through the quantizer's estimator when the layers are quantized.
    // With pre_activation (quantized layers only): din = act'(pre_activation) * d(input), in the same pass.
    auto linear_backward = [&](int l, Site site, bf16* din, bool accumulate, size_t weight_offset, const bf16* dout,
                               const bf16* in, int in_dim, int out_dim, const bf16* pre_activation = nullptr,
                               MlpActivation activation = MlpActivation::Gelu) {
        if (!quantized) {
            matmul_backward_input_gpu(din, dout, W + weight_offset, N, in_dim, out_dim, accumulate);
            matmul_backward_weight_gpu(G + weight_offset, dout, in, N, in_dim, out_dim);
            return;
        }
        const QuantSite& q = input_site(s, l, site);
        const QuantSite& qw = s.quant_sites[size_t(l) * kSites + site];
        const bool offline = s.quant.weights_offline;
        const int block = hadamard_block_for(in_dim, s.quant.hadamard_block);
        matmul_backward_input_gpu(s.quant_d_input.data(), dout, offline ? W + weight_offset : qw.weight.data(), N,
                                  in_dim, out_dim);
        if (pre_activation)
            masked_hadamard_activation_rows_gpu(din, s.quant_d_input.data(), q.input_keep.data(), pre_activation,
                                                activation, N, in_dim, block);
        else
            masked_hadamard_rows_gpu(din, s.quant_d_input.data(), q.input_keep.data(), N, in_dim, block, accumulate);
        matmul_backward_weight_gpu(s.quant_d_weight.data(), dout, q.input.data(), N, in_dim, out_dim,
                                   /*accumulate=*/false);
        masked_hadamard_rows_gpu(G + weight_offset, s.quant_d_weight.data(), qw.weight_keep.data(), out_dim, in_dim,
                                 offline ? 0 : block, /*accumulate=*/true);
    };

    // Head: d(final_normed) = dlogits E, dE += dlogits^T final_normed.
    matmul_backward_input_gpu(d_a, s.logits.data(), W + layout_.embed, N, C, Vp);
    matmul_backward_weight_gpu(G + layout_.embed, s.logits.data(), s.final_normed.data(), N, C, Vp);
    const bf16* top = s.residual.back().data();
    // gpt2: each LayerNorm backward also sums the bias gradient of the projection whose output
    // joined the stream below it (the top layer's MLP down projection here).
    if (gpt2)
        layernorm_backward_gpu(d_res, G + layout_.final_norm_w, G + layout_.final_norm_b, d_a, top,
                               P + layout_.final_norm_w, s.final_mean.data(), s.final_rstd.data(), N, C,
                               /*accumulate=*/false, G + layout_.layers.back().down_b);
    else
        rmsnorm_backward_gpu(d_res, G + layout_.final_norm_w, d_a, top, P + layout_.final_norm_w, s.final_rstd.data(),
                             N, C);

    for (int l = config_.n_layers - 1; l >= 0; --l) {
        const LayerOffsets& o = layout_.layers[size_t(l)];
        LayerActivations& a = s.layers[size_t(l)];
        const bf16* x = s.residual[size_t(l)].data();
        bf16* qkv = a.qkv.data();
        bf16* d_qkv = s.d_qkv.data();
        if (gpt2) {
            // y = h + down(gelu(up(LN2(h)))) ; d_res holds dy, becomes dh.
            if (quantized) {
                if (s.recompute)  // its quantized input again
                    activation_operands(s, W, l, a.up.data(), MlpActivation::Gelu, o.down_w, N, F);
                linear_backward(l, kDown, s.d_wide2.data(), false, o.down_w, d_res, nullptr, F, C, a.up.data(),
                                MlpActivation::Gelu);
            } else {
                bf16* act = activation_buffer(a, s.act_scratch, s.recompute);
                if (s.recompute) gelu_forward_gpu(act, a.up.data(), size_t(N) * F);
                matmul_backward_input_dgelu_gpu(s.d_wide2.data(), d_res, W + o.down_w, a.up.data(), N, F, C);
                matmul_backward_weight_gpu(G + o.down_w, d_res, act, N, F, C);
            }
            linear_backward(l, kUp, d_b, false, o.up_w, s.d_wide2.data(), a.ln2.data(), C, F);
            matmul_backward_bias_gpu(G + o.up_b, s.d_wide2.data(), N, F);
            layernorm_backward_gpu(d_res, G + o.norm2_w, G + o.norm2_b, d_b, a.h.data(), P + o.norm2_w,
                                   a.mean2.data(), a.rstd2.data(), N, C, /*accumulate=*/true, G + o.out_b);
            // h = x + out(attn(qkv(LN1(x)))) ; d_res becomes dx.
            linear_backward(l, kOut, d_b, false, o.out_w, d_res, a.attn.data(), C, C);
            attention_backward_gpu({d_qkv, 3 * C}, {d_qkv + C, 3 * C}, {d_qkv + 2 * C, 3 * C}, s.delta.data(),
                                   {d_b, C}, {a.attn.data(), C}, a.lse.data(), {qkv, 3 * C}, {qkv + C, 3 * C},
                                   {qkv + 2 * C, 3 * C}, batch, T, H, hd);
            linear_backward(l, kQkv, d_b, false, o.qkv_w, d_qkv, a.ln1.data(), C, 3 * C);
            matmul_backward_bias_gpu(G + o.qkv_b, d_qkv, N, 3 * C);
            layernorm_backward_gpu(d_res, G + o.norm1_w, G + o.norm1_b, d_b, x, P + o.norm1_w, a.mean1.data(),
                                   a.rstd1.data(), N, C, /*accumulate=*/true,
                                   l > 0 ? G + layout_.layers[size_t(l) - 1].down_b : nullptr);
        } else {
            // y = h + Norm2(down(relu2(up(h)))) ; d_res holds dy, becomes dh.
            rmsnorm_backward_gpu(d_a, G + o.norm2_w, d_res, a.down.data(), P + o.norm2_w, a.rstd_down.data(), N, C);
            if (quantized) {
                if (s.recompute)  // its quantized input again
                    activation_operands(s, W, l, a.up.data(), MlpActivation::Relu2, o.down_w, N, F);
                linear_backward(l, kDown, s.d_wide2.data(), false, o.down_w, d_a, nullptr, F, C, a.up.data(),
                                MlpActivation::Relu2);
            } else {
                bf16* act = activation_buffer(a, s.act_scratch, s.recompute);
                if (s.recompute) relu2_forward_gpu(act, a.up.data(), size_t(N) * F);
                linear_backward(l, kDown, s.d_wide.data(), false, o.down_w, d_a, act, F, C);
                relu2_backward_gpu(s.d_wide2.data(), s.d_wide.data(), a.up.data(), size_t(N) * F);
            }
            linear_backward(l, kUp, d_res, /*accumulate=*/true, o.up_w, s.d_wide2.data(), a.h.data(), C, F);
            // h = x + Norm1(out(attn(rope(qknorm(qkv(x)))))) ; d_res becomes dx.
            rmsnorm_backward_gpu(d_a, G + o.norm1_w, d_res, a.proj.data(), P + o.norm1_w, a.rstd_proj.data(), N, C);
            linear_backward(l, kOut, d_b, false, o.out_w, d_a, a.attn.data(), C, C);
            attention_backward_gpu({s.d_q.data(), C}, {s.d_k.data(), C}, {d_qkv + 2 * C, 3 * C}, s.delta.data(),
                                   {d_b, C}, {a.attn.data(), C}, a.lse.data(), {a.q_rot.data(), C},
                                   {a.k_rot.data(), C}, {qkv + 2 * C, 3 * C}, batch, T, H, hd);
            rope_backward_gpu(s.d_q.data(), s.d_q.data(), s.rope_cos.data(), s.rope_sin.data(), N, T, H, hd);
            rope_backward_gpu(s.d_k.data(), s.d_k.data(), s.rope_cos.data(), s.rope_sin.data(), N, T, H, hd);
            rmsnorm_backward_gpu({d_qkv, 3 * C}, G + o.q_norm_w, {s.d_q.data(), C}, {qkv, 3 * C}, P + o.q_norm_w,
                                 a.rstd_q.data(), N, C);
            rmsnorm_backward_gpu({d_qkv + C, 3 * C}, G + o.k_norm_w, {s.d_k.data(), C}, {qkv + C, 3 * C},
                                 P + o.k_norm_w, a.rstd_k.data(), N, C);
            linear_backward(l, kQkv, d_res, /*accumulate=*/true, o.qkv_w, d_qkv, x, C, 3 * C);
        }
        // Block l's gradients are final now (gpt2's LayerNorm backward of block l + 1 wrote its
        // down projection's bias; the top block's, the final LayerNorm's).
        if (s.gradients_ready) {
            const size_t begin = layout_.layer_starts[size_t(l)];
            const size_t end = l == config_.n_layers - 1 ? layout_.total : layout_.layer_starts[size_t(l) + 1];
            s.gradients_ready(begin, end - begin);
        }
    }
    // Embeddings: the batch's positions grouped by token id for a deterministic sum.
    const TokenBuckets buckets = build_token_buckets(s.host_inputs.data(), N, config_.vocab_size);
    s.bucket_tokens.upload_prefix(buckets.tokens);
    s.bucket_offsets.upload_prefix(buckets.offsets);
    s.bucket_positions.upload_prefix(buckets.positions);
    embedding_backward_gpu(G + layout_.embed, layout_.pos_embed == kAbsent ? nullptr : G + layout_.pos_embed, d_res,
                           s.bucket_tokens.data(), s.bucket_offsets.data(), s.bucket_positions.data(),
                           int(buckets.tokens.size()), N, T, C);
    // The embeddings (the tied head's gradient included) are final only now.
    if (s.gradients_ready) s.gradients_ready(0, layout_.layer_starts[0]);
}

double GpuModel::mean_loss() {
    const std::vector<float> losses = token_losses();
    double sum = 0;
    for (float loss : losses) sum += double(loss);
    return sum / double(losses.size());
}

std::vector<float> GpuModel::token_losses() {
    const size_t N = size_t(state_->batch) * state_->seq_len;
    std::vector<float> host(N);
    CUDA_CHECK(cudaMemcpy(host.data(), state_->losses.data(), N * sizeof(float), cudaMemcpyDeviceToHost));
    return host;
}

double GpuModel::forward_backward(const int* inputs, const int* targets, int batch, int seq_len, float grad_scale) {
    forward(inputs, targets, batch, seq_len, grad_scale);
    if (grad_scale != 0.0f) backward();
    return mean_loss();
}

}  // namespace qopt
