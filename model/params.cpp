#include "model/params.hpp"

#include <cmath>

#include "core/error.hpp"

namespace qopt {

const char* param_kind_name(ParamKind kind) {
    switch (kind) {
        case ParamKind::Embedding: return "embedding";
        case ParamKind::Position: return "position";
        case ParamKind::Matrix: return "matrix";
        case ParamKind::NormWeight: return "norm";
        case ParamKind::Bias: return "bias";
    }
    return "?";
}

size_t ParamLayout::append(const std::string& name, std::vector<int64_t> shape, ParamKind kind, float init_std) {
    ParamTensor t;
    t.name = name;
    t.shape = std::move(shape);
    t.numel = 1;
    for (int64_t d : t.shape) t.numel *= size_t(d);
    t.offset = total;
    t.kind = kind;
    t.init_std = init_std;
    total += t.numel;
    tensors.push_back(t);
    return t.offset;
}

ParamLayout ParamLayout::build(const ModelConfig& c) {
    c.validate();
    ParamLayout layout;
    const bool gpt2 = c.arch == Arch::Gpt2;
    const int64_t C = c.d_model, F = c.d_ff;
    // GPT-2 (and llm.c) shrink the init of the projections that write into the residual
    // stream by 1/sqrt(2 * n_layers); OLMo2 uses 0.02 throughout.
    const float base_std = 0.02f;
    const float residual_std = gpt2 ? base_std / std::sqrt(2.0f * c.n_layers) : base_std;
    auto add = [&](const std::string& name, std::vector<int64_t> shape, ParamKind kind, float std = 0) {
        return layout.append(name, std::move(shape), kind, std);
    };
    layout.embed = add("embed.weight", {c.padded_vocab_size, C}, ParamKind::Embedding, base_std);
    if (gpt2) layout.pos_embed = add("pos_embed.weight", {c.max_seq_len, C}, ParamKind::Position, base_std);
    for (int l = 0; l < c.n_layers; ++l) {
        const std::string p = "layers." + std::to_string(l) + ".";
        layout.layer_starts.push_back(layout.total);
        LayerOffsets o;
        if (gpt2) {
            o.norm1_w = add(p + "attn_in_norm.weight", {C}, ParamKind::NormWeight);
            o.norm1_b = add(p + "attn_in_norm.bias", {C}, ParamKind::Bias);
        }
        o.qkv_w = add(p + "attn.qkv.weight", {3 * C, C}, ParamKind::Matrix, base_std);
        if (gpt2) o.qkv_b = add(p + "attn.qkv.bias", {3 * C}, ParamKind::Bias);
        if (!gpt2) {
            o.q_norm_w = add(p + "attn.q_norm.weight", {C}, ParamKind::NormWeight);
            o.k_norm_w = add(p + "attn.k_norm.weight", {C}, ParamKind::NormWeight);
        }
        o.out_w = add(p + "attn.out.weight", {C, C}, ParamKind::Matrix, residual_std);
        if (gpt2) o.out_b = add(p + "attn.out.bias", {C}, ParamKind::Bias);
        if (!gpt2) o.norm1_w = add(p + "attn_out_norm.weight", {C}, ParamKind::NormWeight);
        if (gpt2) {
            o.norm2_w = add(p + "mlp_in_norm.weight", {C}, ParamKind::NormWeight);
            o.norm2_b = add(p + "mlp_in_norm.bias", {C}, ParamKind::Bias);
        }
        o.up_w = add(p + "mlp.up.weight", {F, C}, ParamKind::Matrix, base_std);
        if (gpt2) o.up_b = add(p + "mlp.up.bias", {F}, ParamKind::Bias);
        o.down_w = add(p + "mlp.down.weight", {C, F}, ParamKind::Matrix, residual_std);
        if (gpt2) o.down_b = add(p + "mlp.down.bias", {C}, ParamKind::Bias);
        if (!gpt2) o.norm2_w = add(p + "mlp_out_norm.weight", {C}, ParamKind::NormWeight);
        layout.layers.push_back(o);
    }
    layout.layer_starts.push_back(layout.total);
    layout.final_norm_w = add("final_norm.weight", {C}, ParamKind::NormWeight);
    if (gpt2) layout.final_norm_b = add("final_norm.bias", {C}, ParamKind::Bias);
    return layout;
}

const ParamTensor* ParamLayout::find(const std::string& name) const {
    for (const auto& t : tensors)
        if (t.name == name) return &t;
    return nullptr;
}

std::vector<LinearMatrix> linear_matrices(const ModelConfig& c, const ParamLayout& layout) {
    std::vector<LinearMatrix> out;
    const int C = c.d_model, F = c.d_ff;
    for (int l = 0; l < int(layout.layers.size()); ++l) {
        const LayerOffsets& o = layout.layers[size_t(l)];
        out.push_back({l, kSiteQkv, o.qkv_w, 3 * C, C, o.qkv_b, {}});
        out.push_back({l, kSiteOut, o.out_w, C, C, o.out_b, {}});
        out.push_back({l, kSiteUp, o.up_w, F, C, o.up_b, {}});
        out.push_back({l, kSiteDown, o.down_w, C, F, o.down_b, {}});
    }
    for (LinearMatrix& m : out)
        for (const ParamTensor& t : layout.tensors)
            if (t.offset == m.offset) m.name = t.name;
    return out;
}

LinearMatrix linear_matrix(const ModelConfig& config, const ParamLayout& layout, int layer, int site) {
    QOPT_CHECK(layer >= 0 && layer < config.n_layers && site >= 0 && site < kLinearSites, "no linear layer ", layer,
               " site ", site);
    return linear_matrices(config, layout)[size_t(layer) * kLinearSites + size_t(site)];
}

size_t non_embedding_parameters(const ModelConfig& config, const ParamLayout& layout) {
    size_t embedding = size_t(config.padded_vocab_size) * config.d_model;
    if (layout.pos_embed != kAbsent) embedding += size_t(config.max_seq_len) * config.d_model;
    return layout.total - embedding;
}

}  // namespace qopt
