// The whole CPU model: loss at initialisation, end-to-end gradient against central finite
// differences in float64 (both layouts, every parameter tensor), float vs double agreement,
// parameter counts of the presets, and bad input.
#include "core/error.hpp"
#include "helpers.hpp"
#include "model/cpu_model.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

ModelConfig tiny_config(Arch arch) {
    ModelConfig c;
    c.arch = arch;
    c.vocab_size = 23;
    c.padded_vocab_size = 32;
    c.n_layers = 2;
    c.d_model = 8;
    c.n_heads = 2;
    c.d_ff = 12;
    c.max_seq_len = 8;
    c.norm_eps = arch == Arch::Gpt2 ? 1e-5f : 1e-6f;
    return c;
}

}  // namespace

TEST_CASE("end-to-end gradient matches finite differences in float64 (olmo2 and gpt2)") {
    // Bound: per tensor, relative error below 1e-6 (central differences, h = 1e-5, float64).
    for (Arch arch : {Arch::Olmo2, Arch::Gpt2}) {
        const uint64_t seed = fresh_seed();
        CAPTURE(arch_name(arch));
        CAPTURE(seed);
        const ModelConfig config = tiny_config(arch);
        CpuModel<double> model(config);
        // Larger than default init so every path carries signal; random norm gains and biases too.
        std::mt19937_64 gen(seed);
        auto init = random_vector<double>(model.layout().total, gen, 0.3);
        model.params() = init;
        for (const auto& t : model.layout().tensors)
            if (t.kind == ParamKind::NormWeight)
                for (size_t i = 0; i < t.numel; ++i) model.params()[t.offset + i] += 1.0;
        const int B = 2, T = 5;
        std::vector<int> inputs(B * T), targets(B * T);
        for (auto& t : inputs) t = int(gen() % 23);
        for (auto& t : targets) t = int(gen() % 23);
        model.zero_grads();
        model.forward_backward(inputs.data(), targets.data(), B, T, 1.0);
        const std::vector<double> analytic = model.grads();
        const double h = 1e-5;
        for (const auto& t : model.layout().tensors) {
            CAPTURE(t.name);
            // Every element of small tensors; a strided subset of the embedding.
            const size_t stride = t.kind == ParamKind::Embedding ? 7 : 1;
            std::vector<double> numeric, exact;
            for (size_t i = 0; i < t.numel; i += stride) {
                double& p = model.params()[t.offset + i];
                const double saved = p;
                p = saved + h;
                const double plus = model.loss(inputs.data(), targets.data(), B, T);
                p = saved - h;
                const double minus = model.loss(inputs.data(), targets.data(), B, T);
                p = saved;
                numeric.push_back((plus - minus) / (2 * h));
                exact.push_back(analytic[t.offset + i]);
            }
            CHECK(relative_error(exact, numeric) < 1e-6);
        }
    }
}

TEST_CASE("loss at initialisation is close to log(vocab) and float agrees with double") {
    for (Arch arch : {Arch::Olmo2, Arch::Gpt2}) {
        CAPTURE(arch_name(arch));
        ModelConfig config = tiny_config(arch);
        config.vocab_size = 500;
        config.padded_vocab_size = 512;
        CpuModel<double> model64(config);
        CpuModel<float> model32(config);
        init_params(model64.layout(), 7, model64.params().data());
        init_params(model32.layout(), 7, model32.params().data());
        std::mt19937_64 gen(fresh_seed());
        const int B = 3, T = 8;
        std::vector<int> inputs(B * T), targets(B * T);
        for (auto& t : inputs) t = int(gen() % 500);
        for (auto& t : targets) t = int(gen() % 500);
        const double loss64 = model64.forward_backward(inputs.data(), targets.data(), B, T, 1.0);
        const double loss32 = model32.forward_backward(inputs.data(), targets.data(), B, T, 1.0f);
        CHECK(loss64 == doctest::Approx(std::log(500.0)).epsilon(0.01));
        CHECK(loss32 == doctest::Approx(loss64).epsilon(1e-5));
        // fp32 gradients within 1e-4 relative of fp64.
        CHECK(relative_error(model32.grads(), model64.grads()) < 1e-4);
    }
}

TEST_CASE("gradient accumulation: two half-scaled passes equal one full pass") {
    const ModelConfig config = tiny_config(Arch::Olmo2);
    CpuModel<double> a(config), b(config);
    init_params(a.layout(), 3, a.params().data());
    b.params() = a.params();
    std::vector<int> x = {1, 2, 3, 4, 5, 6, 7, 8}, y = {2, 3, 4, 5, 6, 7, 8, 9};
    a.zero_grads();
    b.zero_grads();
    a.forward_backward(x.data(), y.data(), 2, 4, 1.0);
    b.forward_backward(x.data(), y.data(), 2, 4, 0.5);
    b.forward_backward(x.data(), y.data(), 2, 4, 0.5);
    CHECK(relative_error(b.grads(), a.grads()) < 1e-14);
}

TEST_CASE("bad input to the model is refused with a message") {
    CpuModel<float> model(tiny_config(Arch::Gpt2));
    std::vector<int> x(8, 1), y(8, 1);
    y[3] = 23;  // == vocab_size
    CHECK_THROWS_WITH_AS(model.loss(x.data(), y.data(), 2, 4), doctest::Contains("target token id 23 at position 3"),
                         Error);
    y[3] = 1;
    x[0] = -1;
    CHECK_THROWS_WITH_AS(model.loss(x.data(), y.data(), 2, 4), doctest::Contains("input token id -1"), Error);
    std::vector<int> long_x(18, 1), long_y(18, 1);
    CHECK_THROWS_WITH_AS(model.loss(long_x.data(), long_y.data(), 1, 18), doctest::Contains("exceeds the model's max_seq_len 8"),
                         Error);
}

TEST_CASE("presets: exact parameter counts follow from the shapes") {
    // gpt2-124m must be llm.c's 124,475,904 parameters (vocab padded to 50304).
    CHECK(ParamLayout::build(preset_config("gpt2-124m")).total == 124475904u);
    for (const auto& p : presets()) {
        CAPTURE(p.name);
        const ModelConfig& c = p.config;
        const uint64_t C = uint64_t(c.d_model), F = uint64_t(c.d_ff), L = uint64_t(c.n_layers);
        uint64_t expected = uint64_t(c.padded_vocab_size) * C;
        if (c.arch == Arch::Gpt2)
            expected += uint64_t(c.max_seq_len) * C + L * (4 * C + 3 * C * C + 3 * C + C * C + C + 2 * C * F + F + C) + 2 * C;
        else
            expected += L * (3 * C * C + 2 * C + C * C + C + 2 * C * F + C) + C;
        const ParamLayout layout = ParamLayout::build(c);
        CHECK(layout.total == expected);
        // Each block's tensors are one range of the buffer (data parallelism reduces them as one
        // part): named "layers.<l>." exactly where layer_starts puts block l.
        REQUIRE(layout.layer_starts.size() == size_t(c.n_layers) + 1);
        for (const ParamTensor& t : layout.tensors) {
            CAPTURE(t.name);
            int block = -1;
            for (int l = 0; l < c.n_layers; ++l)
                if (t.offset >= layout.layer_starts[size_t(l)] && t.offset < layout.layer_starts[size_t(l) + 1]) block = l;
            if (block < 0) CHECK(t.name.rfind("layers.", 0) != 0);
            else CHECK(t.name.rfind("layers." + std::to_string(block) + ".", 0) == 0);
        }
        CHECK(layout.layer_starts[0] == layout.tensors[c.arch == Arch::Gpt2 ? 2 : 1].offset);
    }
    CHECK_THROWS_WITH_AS(preset_config("gpt3"), doctest::Contains("unknown preset 'gpt3'"), Error);
    ModelConfig bad = preset_config("olmo2-tiny");
    bad.n_heads = 3;
    CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("not divisible by n_heads 3"), Error);
}
