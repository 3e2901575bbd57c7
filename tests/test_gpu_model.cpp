// The whole model on the GPU against the CPU reference (float64) on the tiny presets of both
// layouts: loss and every parameter tensor's gradient, bitwise determinism, bad token ids,
// and 20 AdamW training steps through the training backends (GPU vs CPU loss curves).
// Weights are rounded to bf16 first so both sides compute with the same values; the bounds
// then measure bf16 activations over the whole network.
#include "core/error.hpp"
#include "gpu_helpers.hpp"
#include "model/cpu_model.hpp"
#include "model/gpu_model.hpp"
#include "train/backend.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

// Default init with norm gains and biases perturbed, so their gradients are not special cases.
std::vector<float> bf16_exact_params(const ParamLayout& layout, uint64_t seed) {
    std::vector<float> params(layout.total);
    init_params(layout, seed, params.data());
    std::mt19937_64 gen(seed);
    std::normal_distribution<float> noise(0.0f, 0.1f);
    for (const auto& t : layout.tensors)
        if (t.kind == ParamKind::NormWeight || t.kind == ParamKind::Bias)
            for (size_t i = 0; i < t.numel; ++i) params[t.offset + i] += noise(gen);
    for (float& p : params) p = __bfloat162float(__float2bfloat16(p));
    return params;
}


}  // namespace

TEST_CASE("GPU model: loss and every parameter gradient match the CPU reference (olmo2-tiny, gpt2-tiny)") {
    REQUIRE_GPU();
    for (const char* preset : {"olmo2-tiny", "gpt2-tiny"}) {
        const uint64_t seed = fresh_seed();
        CAPTURE(preset);
        CAPTURE(seed);
        std::mt19937_64 gen(seed);
        const ModelConfig config = preset_config(preset);
        const int B = 3, T = 50;  // T not a multiple of the attention tile
        const std::vector<int> inputs = random_tokens(size_t(B) * T, config.vocab_size, gen);
        const std::vector<int> targets = random_tokens(size_t(B) * T, config.vocab_size, gen);
        const std::vector<float> params = bf16_exact_params(ParamLayout::build(config), seed);

        CpuModel<double> reference(config);
        reference.params().assign(params.begin(), params.end());
        const double loss_ref = reference.forward_backward(inputs.data(), targets.data(), B, T, 1.0);

        GpuModel model(config);
        model.upload_params(params);
        std::vector<std::vector<float>> grads;
        std::vector<double> losses;
        for (int run = 0; run < 2; ++run) {
            model.zero_grads();
            losses.push_back(model.forward_backward(inputs.data(), targets.data(), B, T, 1.0f));
            grads.push_back(model.download_grads());
        }
        CHECK(losses[0] == losses[1]);
        CHECK(grads[0] == grads[1]);  // bitwise deterministic
        CHECK(losses[0] == doctest::Approx(loss_ref).epsilon(5e-3));
        for (const auto& t : model.layout().tensors) {
            CAPTURE(t.name);
            const std::vector<float> got(grads[0].begin() + long(t.offset), grads[0].begin() + long(t.offset + t.numel));
            const std::vector<double> want(reference.grads().begin() + long(t.offset),
                                           reference.grads().begin() + long(t.offset + t.numel));
            CHECK(relative_error(got, want) < 5e-2);
        }
        // Forward-only loss equals the training loss and leaves gradients alone.
        CHECK(model.loss(inputs.data(), targets.data(), B, T) == losses[0]);
        CHECK(model.download_grads() == grads[1]);
        // Recomputing the MLP activations gives the same loss and gradients (ReLU²: bitwise,
        // the same kernel; GELU: the recomputing kernel rounds like cuBLASLt's epilogue within bf16).
        model.set_recompute(true);
        model.zero_grads();
        CHECK(model.forward_backward(inputs.data(), targets.data(), B, T, 1.0f) == losses[0]);
        const std::vector<float> recomputed = model.download_grads();
        if (config.arch == Arch::Olmo2) CHECK(recomputed == grads[0]);
        else CHECK(relative_error(recomputed, grads[0]) < 1e-2);
    }
}

TEST_CASE("GPU model rejects token ids outside the vocabulary and sequences above max_seq_len") {
    REQUIRE_GPU();
    const ModelConfig config = preset_config("olmo2-tiny");
    GpuModel model(config);
    std::vector<int> inputs(8, 1), targets(8, 2);
    inputs[5] = config.vocab_size;
    CHECK_THROWS_WITH_AS(model.loss(inputs.data(), targets.data(), 1, 8), doctest::Contains("input token id"), Error);
    inputs[5] = 1;
    targets[0] = -1;
    CHECK_THROWS_WITH_AS(model.loss(inputs.data(), targets.data(), 1, 8), doctest::Contains("target token id -1"),
                         Error);
    std::vector<int> long_inputs(size_t(config.max_seq_len) + 1, 1);
    CHECK_THROWS_WITH_AS(model.loss(long_inputs.data(), long_inputs.data(), 1, config.max_seq_len + 1),
                         doctest::Contains("exceeds the model's max_seq_len"), Error);
}

TEST_CASE("GPU training steps follow the CPU reference: 20 AdamW steps, same weights and batches") {
    REQUIRE_GPU();
    for (const char* preset : {"olmo2-tiny", "gpt2-tiny"}) {
        CAPTURE(preset);
        const uint64_t seed = fresh_seed();
        CAPTURE(seed);
        std::mt19937_64 gen(seed);
        const ModelConfig config = preset_config(preset);
        const OptimizerConfig adamw;
        const std::vector<float> params = bf16_exact_params(ParamLayout::build(config), seed);
        auto cpu = make_cpu_backend(config, adamw);
        auto gpu = make_cuda_backend(config, adamw);
        cpu->set_params(params);
        gpu->set_params(params);
        // A learnable stream: short repeating patterns, so the loss falls quickly.
        const int B = 4, T = 64;
        double first_cpu = 0, last_cpu = 0;
        for (int step = 0; step < 20; ++step) {
            std::vector<int> inputs(size_t(B) * T), targets(size_t(B) * T);
            for (size_t i = 0; i < inputs.size(); ++i) {
                inputs[i] = int((i * 7 + gen() % 3) % 97);
                targets[i] = (inputs[i] + 1) % 97;
            }
            double losses[2];
            int which = 0;
            for (TrainBackend* backend : {cpu.get(), gpu.get()}) {
                backend->zero_grads();
                losses[which++] = backend->forward_backward(inputs.data(), targets.data(), B, T, 1.0);
                const double norm = backend->grad_norm();
                backend->step(1e-3, norm > 1.0 ? 1.0 / norm : 1.0);
            }
            CAPTURE(step);
            CHECK(losses[1] == doctest::Approx(losses[0]).epsilon(2e-2));
            if (step == 0) first_cpu = losses[0];
            last_cpu = losses[0];
        }
        CHECK(last_cpu < first_cpu - 1.0);  // it learned, so the comparison was not of a flat curve
    }
}
