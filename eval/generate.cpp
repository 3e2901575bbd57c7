#include "eval/generate.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "eval/eval_model.hpp"

namespace qopt {

int sample_token(const std::vector<float>& logits, const SampleOptions& options, Rng& rng) {
    QOPT_CHECK(!logits.empty(), "no logits to sample from");
    QOPT_CHECK(options.temperature >= 0 && options.top_k >= 0, "temperature and top-k must be non-negative");
    for (float v : logits) QOPT_CHECK(std::isfinite(v), "non-finite logit: the model's weights are damaged");
    if (options.temperature == 0.0)
        return int(std::max_element(logits.begin(), logits.end()) - logits.begin());
    std::vector<int> order(logits.size());
    std::iota(order.begin(), order.end(), 0);
    size_t keep = options.top_k > 0 ? std::min(size_t(options.top_k), logits.size()) : logits.size();
    // Largest first; ties by the smaller id, so the choice does not depend on the sort's internals.
    auto larger = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    std::partial_sort(order.begin(), order.begin() + long(keep), order.end(), larger);
    const double top = logits[order[0]];
    std::vector<double> weights(keep);
    double total = 0;
    for (size_t i = 0; i < keep; ++i) total += weights[i] = std::exp((logits[order[i]] - top) / options.temperature);
    double u = rng.uniform() * total;
    for (size_t i = 0; i < keep; ++i) {
        if (u < weights[i]) return order[i];
        u -= weights[i];
    }
    return order[keep - 1];
}

std::vector<int> generate(EvalModel& model, const float* embed, const std::vector<int>& prompt,
                          const GenerateOptions& options) {
    const ModelConfig& config = model.config();
    QOPT_CHECK(!prompt.empty(), "generation needs a non-empty prompt");
    QOPT_CHECK(options.max_new_tokens >= 0, "--max-new-tokens must be non-negative");
    check_token_ids(prompt.data(), prompt.size(), config.vocab_size, "prompt");
    const int C = config.d_model, V = config.vocab_size;
    // One fixed window length (the model re-plans its buffers only once).
    const size_t wanted = prompt.size() + size_t(options.max_new_tokens);
    const int window = int(std::min<size_t>(size_t(config.max_seq_len), (wanted + 63) / 64 * 64));
    Rng rng(options.seed);
    std::vector<int> tokens = prompt, generated;
    std::vector<int> inputs(static_cast<size_t>(window)), targets(static_cast<size_t>(window), 0);
    std::vector<float> hidden(static_cast<size_t>(C)), logits(static_cast<size_t>(V));
    int last_row = 0;
    model.set_module_tap(
        [&](int, Module, const float* out, int, int cols) {
            std::copy(out + size_t(last_row) * cols, out + size_t(last_row + 1) * cols, hidden.begin());
        },
        [](int, Module module) { return module == Module::FinalNorm; });
    for (int step = 0; step < options.max_new_tokens; ++step) {
        const size_t start = tokens.size() > size_t(window) ? tokens.size() - size_t(window) : 0;
        std::fill(inputs.begin(), inputs.end(), 0);
        std::copy(tokens.begin() + long(start), tokens.end(), inputs.begin());
        last_row = int(tokens.size() - start) - 1;  // causal: the padding after it does not matter
        model.loss(inputs.data(), targets.data(), 1, window);
#pragma omp parallel for schedule(static)
        for (int v = 0; v < V; ++v) {
            const float* e = embed + size_t(v) * C;
            double dot = 0;
            for (int c = 0; c < C; ++c) dot += double(e[c]) * hidden[size_t(c)];
            logits[size_t(v)] = float(dot);
        }
        const int next = sample_token(logits, options.sample, rng);
        tokens.push_back(next);
        generated.push_back(next);
        if (next == options.stop_token) break;
    }
    model.set_module_tap(nullptr);
    return generated;
}

}  // namespace qopt
