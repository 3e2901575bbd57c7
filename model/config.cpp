#include "model/config.hpp"

#include "core/error.hpp"

namespace qopt {

const char* arch_name(Arch arch) { return arch == Arch::Olmo2 ? "olmo2" : "gpt2"; }

Arch parse_arch(const std::string& name) {
    if (name == "olmo2") return Arch::Olmo2;
    if (name == "gpt2") return Arch::Gpt2;
    fail("unknown architecture '", name, "' (known: olmo2, gpt2)");
}

void ModelConfig::validate() const {
    QOPT_CHECK(vocab_size > 0, "vocab_size must be positive, got ", vocab_size);
    QOPT_CHECK(padded_vocab_size >= vocab_size, "padded_vocab_size ", padded_vocab_size,
               " is below vocab_size ", vocab_size);
    QOPT_CHECK(n_layers > 0, "n_layers must be positive, got ", n_layers);
    QOPT_CHECK(d_model > 0, "d_model must be positive, got ", d_model);
    QOPT_CHECK(n_heads > 0, "n_heads must be positive, got ", n_heads);
    QOPT_CHECK(d_model % n_heads == 0, "d_model ", d_model, " is not divisible by n_heads ", n_heads);
    QOPT_CHECK(arch != Arch::Olmo2 || head_dim() % 2 == 0, "RoPE needs an even head dimension, got ",
               head_dim());
    QOPT_CHECK(d_ff > 0, "d_ff must be positive, got ", d_ff);
    QOPT_CHECK(max_seq_len > 0, "max_seq_len must be positive, got ", max_seq_len);
    QOPT_CHECK(rope_theta > 0, "rope_theta must be positive");
    QOPT_CHECK(norm_eps > 0, "norm_eps must be positive");
    // Far above any real model, low enough that laying one out cannot exhaust memory (a damaged
    // checkpoint's config is refused here, before anything is allocated for it).
    auto at_most = [](const char* what, int value, int limit) {
        QOPT_CHECK(value <= limit, what, " ", value, " is above the supported maximum ", limit);
    };
    at_most("padded_vocab_size", padded_vocab_size, 1 << 24);
    at_most("n_layers", n_layers, 1024);
    at_most("d_model", d_model, 1 << 16);
    at_most("d_ff", d_ff, 1 << 18);
    at_most("max_seq_len", max_seq_len, 1 << 20);
}

Json ModelConfig::to_json() const {
    Json json = Json::object();
    json["arch"] = arch_name(arch);
    json["vocab_size"] = vocab_size;
    json["padded_vocab_size"] = padded_vocab_size;
    json["n_layers"] = n_layers;
    json["d_model"] = d_model;
    json["n_heads"] = n_heads;
    json["d_ff"] = d_ff;
    json["max_seq_len"] = max_seq_len;
    json["rope_theta"] = double(rope_theta);
    json["norm_eps"] = double(norm_eps);
    return json;
}

ModelConfig ModelConfig::from_json(const Json& json) {
    ModelConfig c;
    c.arch = parse_arch(json.at("arch").as_string("arch"));
    c.vocab_size = int(json.at("vocab_size").as_int("vocab_size"));
    c.padded_vocab_size = int(json.at("padded_vocab_size").as_int("padded_vocab_size"));
    c.n_layers = int(json.at("n_layers").as_int("n_layers"));
    c.d_model = int(json.at("d_model").as_int("d_model"));
    c.n_heads = int(json.at("n_heads").as_int("n_heads"));
    c.d_ff = int(json.at("d_ff").as_int("d_ff"));
    c.max_seq_len = int(json.at("max_seq_len").as_int("max_seq_len"));
    c.rope_theta = float(json.at("rope_theta").as_double("rope_theta"));
    c.norm_eps = float(json.at("norm_eps").as_double("norm_eps"));
    c.validate();
    return c;
}

std::string ModelConfig::difference(const ModelConfig& other) const {
    std::string out;
    auto field = [&](const char* name, auto a, auto b) {
        if (a != b) out += concat(out.empty() ? "" : ", ", name, " ", a, " vs ", b);
    };
    field("arch", std::string(arch_name(arch)), std::string(arch_name(other.arch)));
    field("vocab_size", vocab_size, other.vocab_size);
    field("padded_vocab_size", padded_vocab_size, other.padded_vocab_size);
    field("n_layers", n_layers, other.n_layers);
    field("d_model", d_model, other.d_model);
    field("n_heads", n_heads, other.n_heads);
    field("d_ff", d_ff, other.d_ff);
    field("max_seq_len", max_seq_len, other.max_seq_len);
    field("rope_theta", rope_theta, other.rope_theta);
    field("norm_eps", norm_eps, other.norm_eps);
    return out;
}

// The paper's sizes (50M..1.5B) do not publish widths and depths. These follow OLMo2 /
// GPT-3-like ratios: head dimension 64 up to 350M and 128 above (the head dims the GPU
// attention kernel supports), MLP width 4*d_model (ReLU^2 has no gate), depth growing
// with width. Parameter counts include the tied 50304-row embedding.
static ModelConfig olmo2(int n_layers, int d_model, int n_heads, int max_seq_len = 1024) {
    ModelConfig c;
    c.arch = Arch::Olmo2;
    c.n_layers = n_layers;
    c.d_model = d_model;
    c.n_heads = n_heads;
    c.d_ff = 4 * d_model;
    c.max_seq_len = max_seq_len;
    c.norm_eps = 1e-6f;
    return c;
}

static ModelConfig gpt2(int n_layers, int d_model, int n_heads, int max_seq_len = 1024) {
    ModelConfig c = olmo2(n_layers, d_model, n_heads, max_seq_len);
    c.arch = Arch::Gpt2;
    c.norm_eps = 1e-5f;
    return c;
}

const std::vector<Preset>& presets() {
    static const std::vector<Preset> all = {
        {"olmo2-tiny", "2 x 64, 4 heads: unit tests", olmo2(2, 64, 4, 256)},
        {"olmo2-mini", "4 x 128, 4 heads, T<=256: CPU demo runs (make run)", olmo2(4, 128, 4, 256)},
        {"olmo2-50m", "8 x 512, 8 heads", olmo2(8, 512, 8)},
        {"olmo2-125m", "12 x 768, 12 heads", olmo2(12, 768, 12)},
        {"olmo2-350m", "24 x 1024, 16 heads", olmo2(24, 1024, 16)},
        {"olmo2-500m", "22 x 1280, 10 heads of 128", olmo2(22, 1280, 10)},
        {"olmo2-760m", "24 x 1536, 12 heads of 128", olmo2(24, 1536, 12)},
        {"olmo2-1.5b", "28 x 2048, 16 heads of 128", olmo2(28, 2048, 16)},
        {"gpt2-tiny", "2 x 64, 4 heads: unit tests", gpt2(2, 64, 4, 256)},
        {"gpt2-mini", "4 x 128, 4 heads, T<=256: CPU demo runs", gpt2(4, 128, 4, 256)},
        {"gpt2-124m", "GPT-2 small: 12 x 768, 12 heads (llm.c's shape)", gpt2(12, 768, 12)},
        {"gpt2-350m", "GPT-2 medium: 24 x 1024, 16 heads", gpt2(24, 1024, 16)},
    };
    return all;
}

std::string preset_names() {
    std::string names;
    for (const auto& p : presets()) names += (names.empty() ? "" : ", ") + p.name;
    return names;
}

ModelConfig preset_config(const std::string& name) {
    for (const auto& p : presets())
        if (p.name == name) return p.config;
    fail("unknown preset '", name, "' (known: ", preset_names(), ")");
}

void check_token_ids(const int* tokens, size_t n, int vocab_size, const char* what) {
    for (size_t i = 0; i < n; ++i)
        QOPT_CHECK(tokens[i] >= 0 && tokens[i] < vocab_size, what, " token id ", tokens[i], " at position ", i,
                   " is outside the vocabulary 0..", vocab_size - 1);
}

}  // namespace qopt
