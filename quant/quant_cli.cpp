#include "quant/quant_cli.hpp"

namespace qopt {

void add_quant_flags(CLI::App& app, QuantOptions& o, const std::string& prefix, QuantStyle style) {
    const bool quest = style == QuantStyle::Quest;
    const std::string group = quest ? "Quantization-aware training" : "Quantization";
    auto flag = [&](const std::string& word) { return "--" + (prefix.empty() ? word : prefix + "-" + word); };
    app.add_option(prefix.empty() ? "--format" : "--" + prefix, o.format,
                   std::string("Bit widths of the hidden linear layers' weights and inputs: wXaY (w4a4, w4a16, w8a8; "
                               "16 = not quantized) or off") +
                       (quest ? "; the tied embedding/head stays in full precision" : ""))
        ->group(group);
    app.add_option(flag("grid"), o.grid,
                   std::string("symmetric (int with zero), asymmetric (zero point) or centered (QuEST: 2^b levels, "
                               "no zero) (default: ") + (quest ? "centered)" : "symmetric)"))
        ->group(group);
    const std::string rules = std::string("absmax, clip (--") + (prefix.empty() ? "" : prefix + "-") +
                              "clip-ratio x absmax), mse (search) or gaussian (alpha_b x RMS, QuEST) (default: " +
                              (quest ? "gaussian)" : "absmax)");
    app.add_option(flag("weight-rule"), o.weight_rule, "Weight scale rule: " + rules)->group(group);
    app.add_option(flag("act-rule"), o.act_rule, "Activation scale rule: " + rules)->group(group);
    app.add_option(flag("granularity"), o.granularity,
                   "One scale per tensor, row (weights: output channel; activations: token) or group (default: row)")
        ->group(group);
    app.add_option(flag("group-size"), o.group_size, "Elements per group (granularity group)")->group(group);
    app.add_option(flag("hadamard"), o.hadamard,
                   std::string("Hadamard block size along the input dimension (power of two; 0: no rotation; -1: "
                               "the default, ") + (quest ? "128 when quantizing)" : "0)"))
        ->group(group);
    app.add_option(flag("clip-ratio"), o.clip_ratio, "Clip ratio of the clip rule")->group(group);
    if (quest) {
        app.add_option(flag("estimator"), o.estimator,
                       "Backward estimator: trust (QuEST: gradient only where the quantization error is small) or "
                       "ste (straight-through everywhere) (default: trust)")
            ->group(group);
        app.add_option(flag("trust"), o.trust,
                       "Trust threshold in units of the row's RMS (0: half a quantization step, QuEST's default "
                       "alpha_b / (2^b - 1) for the gaussian rule)")
            ->group(group);
    }
}

}  // namespace qopt
