#include "quant/linear_quant.hpp"

#include <cstdio>

#include "core/error.hpp"
#include "quant/hadamard.hpp"

namespace qopt {

namespace {

// "w4a4" -> (4, 4); 16 means not quantized.
std::pair<int, int> parse_format(const std::string& format) {
    if (format == "off" || format.empty()) return {16, 16};
    int w = 0, a = 0;
    char tail = 0;
    if (std::sscanf(format.c_str(), "w%da%d%c", &w, &a, &tail) != 2)
        fail("quantization format '", format, "' is not wXaY (e.g. w4a4, w4a16, w8a8) or off");
    for (int bits : {w, a})
        QOPT_CHECK((bits >= 2 && bits <= 8) || bits == 16, "quantization format '", format,
                   "': bit widths must be 2..8 or 16 (not quantized)");
    return {w, a};
}

Json spec_json(const QuantSpec& s) {
    Json j = Json::object();
    j["bits"] = s.bits;
    j["grid"] = quant_grid_name(s.grid);
    j["rule"] = scale_rule_name(s.rule);
    j["granularity"] = granularity_name(s.granularity);
    j["group_size"] = s.group_size;
    j["clip_ratio"] = s.clip_ratio;
    j["mse_grid"] = s.mse_grid;
    return j;
}

QuantSpec spec_from_json(const Json& j) {
    QuantSpec s;
    s.bits = int(j.at("bits").as_int("bits"));
    s.grid = parse_quant_grid(j.at("grid").as_string("grid"));
    s.rule = parse_scale_rule(j.at("rule").as_string("rule"));
    s.granularity = parse_granularity(j.at("granularity").as_string("granularity"));
    s.group_size = int(j.at("group_size").as_int("group_size"));
    s.clip_ratio = float(j.at("clip_ratio").as_double("clip_ratio"));
    s.mse_grid = int(j.at("mse_grid").as_int("mse_grid"));
    return s;
}

}  // namespace

void LinearQuantConfig::validate(int d_model, int d_ff) const {
    QOPT_CHECK(hadamard_block == 0 || (hadamard_block >= 2 && is_power_of_two(hadamard_block)),
               "Hadamard block must be 0 (off) or a power of two, not ", hadamard_block);
    for (int dim : {d_model, d_ff}) {
        weights.validate(dim);
        activations.validate(dim);
        QOPT_CHECK(hadamard_block == 0 || hadamard_block_for(dim, hadamard_block) >= 2, "Hadamard block ",
                   hadamard_block, ": no power of two >= 2 divides the layer input width ", dim);
    }
}

std::string LinearQuantConfig::short_name() const {
    if (!weights.enabled() && !activations.enabled()) return hadamard_block > 1 ? "w16a16-rotated" : "off";
    return concat("w", weights.bits, "a", activations.bits);
}

std::string LinearQuantConfig::describe(bool with_estimator) const {
    if (!enabled()) return "off";
    std::string text = short_name() + " (weights: " + (weights_offline ? "quantized offline" : weights.describe()) +
                       "; activations: " + activations.describe();
    text += hadamard_block > 1 ? concat("; Hadamard blocks of ", hadamard_block) : std::string("; no rotation");
    if (with_estimator && (activations.enabled() || (weights.enabled() && !weights_offline)))
        text += trust < 0 ? "; straight-through estimator"
                          : trust == 0 ? "; trust estimator (half a step)" : concat("; trust estimator ", trust, " RMS");
    return text + ")";
}

Json LinearQuantConfig::to_json() const {
    Json j = Json::object();
    j["weights"] = spec_json(weights);
    j["activations"] = spec_json(activations);
    j["hadamard_block"] = hadamard_block;
    j["trust"] = trust;
    j["weights_offline"] = weights_offline;
    return j;
}

LinearQuantConfig LinearQuantConfig::from_json(const Json& j) {
    LinearQuantConfig c;
    c.weights = spec_from_json(j.at("weights"));
    c.activations = spec_from_json(j.at("activations"));
    c.hadamard_block = int(j.at("hadamard_block").as_int("hadamard_block"));
    c.trust = float(j.at("trust").as_double("trust"));
    c.weights_offline = j.at("weights_offline").as_bool("weights_offline");
    return c;
}

LinearQuantConfig resolve_linear_quant(const QuantOptions& o, QuantStyle style) {
    const auto [weight_bits, act_bits] = parse_format(o.format);
    const bool quest = style == QuantStyle::Quest;
    LinearQuantConfig c;
    QuantSpec base;
    base.grid = parse_quant_grid(!o.grid.empty() ? o.grid : quest ? "centered" : "symmetric");
    base.granularity = parse_granularity(!o.granularity.empty() ? o.granularity : "row");
    base.group_size = o.group_size;
    base.clip_ratio = o.clip_ratio;
    c.weights = c.activations = base;
    c.weights.bits = weight_bits;
    c.activations.bits = act_bits;
    const std::string default_rule = quest ? "gaussian" : "absmax";
    c.weights.rule = parse_scale_rule(!o.weight_rule.empty() ? o.weight_rule : default_rule);
    c.activations.rule = parse_scale_rule(!o.act_rule.empty() ? o.act_rule : default_rule);
    // QuEST rotates by default, but only when something is quantized (format off means off).
    const bool quantizing = weight_bits <= 8 || act_bits <= 8;
    c.hadamard_block = o.hadamard >= 0 ? o.hadamard : (quest && quantizing ? 128 : 0);
    const std::string estimator = o.estimator.empty() ? "trust" : o.estimator;
    QOPT_CHECK(estimator == "trust" || estimator == "ste", "unknown estimator '", estimator, "' (trust or ste)");
    QOPT_CHECK(o.trust >= 0, "trust factor must be >= 0 (0: half a quantization step), not ", o.trust);
    c.trust = estimator == "ste" ? -1.0f : o.trust;
    if (c.weights.enabled()) c.weights.validate();
    if (c.activations.enabled()) c.activations.validate();
    return c;
}

}  // namespace qopt
