// Where every parameter lives in the one flat buffer (CPU and GPU alike), its name in
// checkpoints, its shape ([out, in] for linear weights, as PyTorch), and its kind, which
// decides weight decay and, later, which optimizer rule updates it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.hpp"
#include "model/config.hpp"

namespace qopt {

enum class ParamKind { Embedding, Position, Matrix, NormWeight, Bias };
const char* param_kind_name(ParamKind kind);

struct ParamTensor {
    std::string name;
    std::vector<int64_t> shape;
    size_t offset = 0;
    size_t numel = 0;
    ParamKind kind = ParamKind::Matrix;
    float init_std = 0;  // normal(0, init_std); norm weights start at 1, biases at 0
};

constexpr size_t kAbsent = size_t(-1);

// Offsets of one transformer block's tensors (kAbsent where the layout has none).
// norm1/norm2: olmo2's post-attention / post-MLP RMSNorm; gpt2's pre-attention / pre-MLP LN.
struct LayerOffsets {
    size_t qkv_w = kAbsent, qkv_b = kAbsent, out_w = kAbsent, out_b = kAbsent;
    size_t q_norm_w = kAbsent, k_norm_w = kAbsent;
    size_t norm1_w = kAbsent, norm1_b = kAbsent, norm2_w = kAbsent, norm2_b = kAbsent;
    size_t up_w = kAbsent, up_b = kAbsent, down_w = kAbsent, down_b = kAbsent;
};

struct ParamLayout {
    std::vector<ParamTensor> tensors;
    size_t total = 0;
    size_t embed = kAbsent, pos_embed = kAbsent, final_norm_w = kAbsent, final_norm_b = kAbsent;
    std::vector<LayerOffsets> layers;
    // Block l's tensors fill [layer_starts[l], layer_starts[l + 1]); the last entry is where the
    // tensors after the blocks begin (n_layers + 1 entries). Before layer_starts[0]: the embeddings.
    std::vector<size_t> layer_starts;

    static ParamLayout build(const ModelConfig& config);
    const ParamTensor* find(const std::string& name) const;
    // Adds a tensor after the last one; returns its offset.
    size_t append(const std::string& name, std::vector<int64_t> shape, ParamKind kind, float init_std = 0);
};

// The hidden linear layers of every block, in the order the quantized paths use them
// (site 0..3: fused q/k/v, attention output, MLP up, MLP down): the weight's offset and its
// [out, in] shape, its parameter name and its bias's offset (kAbsent: none). The tied
// embedding/head is not among them.
enum LinearSite : int { kSiteQkv = 0, kSiteOut = 1, kSiteUp = 2, kSiteDown = 3, kLinearSites = 4 };
struct LinearMatrix {
    int layer, site;
    size_t offset;
    int rows, cols;  // out, in
    size_t bias = kAbsent;
    std::string name;
};
// Parameters outside the token (and learned position) embedding: the "N" of scaling laws
// that count only the transformer's own weights (the tied head is the embedding).
size_t non_embedding_parameters(const ModelConfig& config, const ParamLayout& layout);

std::vector<LinearMatrix> linear_matrices(const ModelConfig& config, const ParamLayout& layout);
// The one of (layer, site); throws when there is none.
LinearMatrix linear_matrix(const ModelConfig& config, const ParamLayout& layout, int layer, int site);

// Fills `params` (size layout.total) with the initial values, deterministically from seed.
template <typename T>
void init_params(const ParamLayout& layout, uint64_t seed, T* params) {
    Rng rng(seed);
    for (const auto& t : layout.tensors) {
        T* p = params + t.offset;
        for (size_t i = 0; i < t.numel; ++i) {
            if (t.kind == ParamKind::NormWeight) p[i] = T(1);
            else if (t.kind == ParamKind::Bias) p[i] = T(0);
            else p[i] = T(rng.normal() * t.init_std);
        }
    }
}

}  // namespace qopt
