// The network as a chain of modules, h_l = f_l(h_{l-1}), for analyses that look at every
// module's output (the error-propagation analysis of eval/error_propagation.hpp) or at the
// final hidden states (generation). The models call a ModuleHook, when one is set, with each
// module's output in this order:
//   embedding (layer -1);
//   per block, olmo2: qkv, attention (QK-norm, RoPE and softmax attention together), out
//     projection, attention norm (the post-sublayer RMSNorm of the projection), attention
//     residual (h = x + norm), up, activation (ReLU^2), down, MLP norm, MLP residual (y);
//   per block, gpt2: attention norm (LN1, before attention), qkv, attention, out projection,
//     attention residual (h = x + proj), MLP norm (LN2), up, activation (GELU), down, MLP
//     residual (y);
//   final norm (layer n_layers), the head's input.
// A residual add has two inputs; in the chain its input is the branch (the module before it).
#pragma once
#include <vector>

#include "model/config.hpp"
#include "model/params.hpp"

namespace qopt {

enum class Module {
    Embedding,
    AttnNorm,
    Qkv,
    Attention,
    OutProj,
    AttnResidual,
    MlpNorm,
    Up,
    Activation,
    Down,
    MlpResidual,
    FinalNorm,
};

inline const char* module_name(Module m) {
    switch (m) {
        case Module::Embedding: return "embedding";
        case Module::AttnNorm: return "attn_norm";
        case Module::Qkv: return "qkv";
        case Module::Attention: return "attention";
        case Module::OutProj: return "out_proj";
        case Module::AttnResidual: return "attn_residual";
        case Module::MlpNorm: return "mlp_norm";
        case Module::Up: return "up";
        case Module::Activation: return "activation";
        case Module::Down: return "down";
        case Module::MlpResidual: return "mlp_residual";
        case Module::FinalNorm: return "final_norm";
    }
    return "?";
}

// The hidden linear layer a module is, or -1.
inline int module_linear_site(Module m) {
    switch (m) {
        case Module::Qkv: return kSiteQkv;
        case Module::OutProj: return kSiteOut;
        case Module::Up: return kSiteUp;
        case Module::Down: return kSiteDown;
        default: return -1;
    }
}

inline bool module_is_norm(Module m) {
    return m == Module::AttnNorm || m == Module::MlpNorm || m == Module::FinalNorm;
}

// The modules of one block, in forward order.
inline std::vector<Module> block_modules(Arch arch) {
    if (arch == Arch::Gpt2)
        return {Module::AttnNorm, Module::Qkv,        Module::Attention, Module::OutProj, Module::AttnResidual,
                Module::MlpNorm,  Module::Up,         Module::Activation, Module::Down,   Module::MlpResidual};
    return {Module::Qkv,        Module::Attention, Module::OutProj,    Module::AttnNorm, Module::AttnResidual,
            Module::Up,         Module::Activation, Module::Down,      Module::MlpNorm,  Module::MlpResidual};
}

// Width of a module's output.
inline int module_width(const ModelConfig& config, Module m) {
    if (m == Module::Qkv) return 3 * config.d_model;
    if (m == Module::Up || m == Module::Activation) return config.d_ff;
    return config.d_model;
}

}  // namespace qopt
