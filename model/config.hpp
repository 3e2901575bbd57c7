// Model shapes. Two layouts:
//  - olmo2: the study's OLMo2-style model. No biases, RoPE, RMSNorm applied to each
//    sublayer's output before the residual add (h = x + Norm(Attn(x)); y = h + Norm(MLP(h))),
//    QK-norm (RMSNorm over the full query and key projections, as OLMo2 does), ReLU^2 MLP,
//    tied embeddings, final RMSNorm.
//  - gpt2: GPT-2 as in llm.c. Pre-LayerNorm with bias, learned positions, GELU (tanh), biases
//    on every linear layer, tied head.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "core/json.hpp"

namespace qopt {

enum class Arch { Olmo2, Gpt2 };
const char* arch_name(Arch arch);
Arch parse_arch(const std::string& name);

struct ModelConfig {
    Arch arch = Arch::Olmo2;
    int vocab_size = 50257;         // real vocabulary; logits beyond it are never used
    int padded_vocab_size = 50304;  // embedding rows (a multiple of 128 for fast matmuls)
    int n_layers = 2;
    int d_model = 64;
    int n_heads = 4;
    int d_ff = 256;                 // MLP hidden width
    int max_seq_len = 256;
    float rope_theta = 10000.0f;    // olmo2 only
    float norm_eps = 1e-6f;         // RMSNorm eps (olmo2) / LayerNorm eps (gpt2)

    int head_dim() const { return d_model / n_heads; }
    void validate() const;  // throws qopt::Error naming the bad field

    Json to_json() const;
    static ModelConfig from_json(const Json& json);
    // Field-by-field comparison; empty when equal, else "field: a vs b".
    std::string difference(const ModelConfig& other) const;
};

// Throws qopt::Error naming the first id outside 0..vocab_size-1 ("input token id 50300 at
// position 17 is outside the vocabulary 0..50256").
void check_token_ids(const int* tokens, size_t n, int vocab_size, const char* what);

struct Preset {
    std::string name;
    std::string description;
    ModelConfig config;
};

const std::vector<Preset>& presets();
ModelConfig preset_config(const std::string& name);  // throws listing the known names
std::string preset_names();                          // "a, b, c"

}  // namespace qopt
