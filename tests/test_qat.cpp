// Quantized linear layers in the CPU reference model (QAT's oracle), checked against identities
// that need no quantizer knowledge:
//  - rotation alone (w16a16 with Hadamard) changes nothing: loss and gradients equal the plain
//    model's (x H)(w H)^T = x w^T, and the backward's rotation is the transpose;
//  - weight-only quantization with the straight-through estimator is the plain model evaluated
//    at the fake-quantized weights W' = Q(W H) H^T: same loss and the same gradient (the STE
//    passes dW' through the rotation unchanged); with the trust estimator, that gradient masked;
// and QAT training runs (and resumes only as itself) for every optimizer.
#include "core/error.hpp"
#include "helpers.hpp"
#include "model/cpu_model.hpp"
#include "quant/hadamard.hpp"
#include "quant/linear_quant.hpp"
#include "train_helpers.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

LinearQuantConfig quant_config(const std::string& format, int hadamard, const std::string& estimator) {
    QuantOptions o;
    o.format = format;
    o.hadamard = hadamard;
    o.estimator = estimator;
    return resolve_linear_quant(o, QuantStyle::Quest);
}

}  // namespace

TEST_CASE("QAT reference: rotation alone leaves loss and gradients unchanged") {
    for (const char* preset : {"olmo2-tiny", "gpt2-tiny"}) {
        CAPTURE(preset);
        const uint64_t seed = fresh_seed();
        CAPTURE(seed);
        std::mt19937_64 gen(seed);
        const ModelConfig config = preset_config(preset);
        const int B = 2, T = 9;
        const auto inputs = random_tokens(size_t(B) * T, config.vocab_size, gen);
        const auto targets = random_tokens(size_t(B) * T, config.vocab_size, gen);
        CpuModel<double> plain(config), rotated(config);
        std::vector<float> params(plain.layout().total);
        init_params(plain.layout(), seed, params.data());
        plain.params().assign(params.begin(), params.end());
        rotated.params() = plain.params();
        rotated.set_linear_quant(quant_config("off", 32, "trust"));
        REQUIRE(rotated.linear_quant().enabled());
        const double loss = plain.forward_backward(inputs.data(), targets.data(), B, T, 1.0);
        const double loss_rotated = rotated.forward_backward(inputs.data(), targets.data(), B, T, 1.0);
        CHECK(loss_rotated == doctest::Approx(loss).epsilon(1e-12));
        CHECK(relative_error(rotated.grads(), plain.grads()) < 1e-10);
    }
}

TEST_CASE("QAT reference: weight quantization with STE is the plain model at Q(W H) H^T; trust masks it") {
    for (const char* preset : {"olmo2-tiny", "gpt2-tiny"})
        for (int hadamard : {0, 64}) {
            CAPTURE(preset);
            CAPTURE(hadamard);
            const uint64_t seed = fresh_seed();
            CAPTURE(seed);
            std::mt19937_64 gen(seed);
            const ModelConfig config = preset_config(preset);
            const int B = 2, T = 7;
            const auto inputs = random_tokens(size_t(B) * T, config.vocab_size, gen);
            const auto targets = random_tokens(size_t(B) * T, config.vocab_size, gen);
            CpuModel<double> qat(config), plain(config);
            std::vector<float> params(qat.layout().total);
            init_params(qat.layout(), seed, params.data());
            qat.params().assign(params.begin(), params.end());

            // W' = Q(W H) H^T per hidden matrix, with the keep masks of Q.
            const LinearQuantConfig ste = quant_config("w3a16", hadamard, "ste");
            const LinearQuantConfig trust = quant_config("w3a16", hadamard, "trust");
            plain.params() = qat.params();
            std::vector<double> keep_of_param(qat.layout().total, 1.0);
            for (const LinearMatrix& m : linear_matrices(config, qat.layout())) {
                const int block = hadamard_block_for(m.cols, hadamard);
                std::vector<double> w(qat.params().begin() + long(m.offset),
                                      qat.params().begin() + long(m.offset) + long(m.rows) * m.cols);
                hadamard_rows_cpu(w.data(), m.rows, m.cols, block);
                std::vector<uint8_t> keep(w.size());
                fake_quant_cpu(w.data(), keep.data(), w.data(), m.rows, m.cols, trust.weights, trust.trust);
                hadamard_rows_cpu(w.data(), m.rows, m.cols, block);  // H^T = H
                std::copy(w.begin(), w.end(), plain.params().begin() + long(m.offset));
                if (block == 0)  // the mask acts in the rotated basis; compare it directly without rotation
                    for (size_t i = 0; i < keep.size(); ++i) keep_of_param[m.offset + i] = keep[i];
            }
            const double loss_plain = plain.forward_backward(inputs.data(), targets.data(), B, T, 1.0);
            qat.set_linear_quant(ste);
            const double loss_ste = qat.forward_backward(inputs.data(), targets.data(), B, T, 1.0);
            CHECK(loss_ste == doctest::Approx(loss_plain).epsilon(1e-9));
            CHECK(relative_error(qat.grads(), plain.grads()) < 1e-8);
            if (hadamard == 0) {
                qat.zero_grads();
                qat.set_linear_quant(trust);
                qat.forward_backward(inputs.data(), targets.data(), B, T, 1.0);
                std::vector<double> masked = plain.grads();
                long dropped = 0;
                for (size_t i = 0; i < masked.size(); ++i) masked[i] *= keep_of_param[i], dropped += keep_of_param[i] == 0;
                CHECK(dropped > 0);
                CHECK(relative_error(qat.grads(), masked) < 1e-8);
            }
        }
}

TEST_CASE("QAT reference: W4A4 gradients are finite and differ from full precision; bad configs are refused") {
    const ModelConfig config = preset_config("olmo2-tiny");
    CpuModel<float> model(config);
    init_params(model.layout(), 5, model.params().data());
    std::mt19937_64 gen(fresh_seed());
    const auto inputs = random_tokens(64, config.vocab_size, gen), targets = random_tokens(64, config.vocab_size, gen);
    const double loss_fp = model.forward_backward(inputs.data(), targets.data(), 2, 32, 1.0f);
    const std::vector<float> grads_fp = model.grads();
    model.zero_grads();
    model.set_linear_quant(quant_config("w4a4", 64, "trust"));
    const double loss_q = model.forward_backward(inputs.data(), targets.data(), 2, 32, 1.0f);
    CHECK(std::isfinite(loss_q));
    CHECK(loss_q != loss_fp);
    bool finite = true;
    for (float g : model.grads()) finite &= std::isfinite(g);
    CHECK(finite);
    CHECK(relative_error(model.grads(), grads_fp) > 1e-4);
    CHECK(relative_error(model.grads(), grads_fp) < 1.0);

    QuantOptions bad;
    bad.format = "w4x4";
    CHECK_THROWS_WITH_AS(resolve_linear_quant(bad, QuantStyle::Quest), doctest::Contains("wXaY"), Error);
    bad.format = "w4a4", bad.estimator = "lsq";
    CHECK_THROWS_WITH_AS(resolve_linear_quant(bad, QuantStyle::Quest), doctest::Contains("trust or ste"), Error);
    bad.estimator = "", bad.granularity = "group", bad.group_size = 48;
    CHECK_THROWS_WITH_AS(model.set_linear_quant(resolve_linear_quant(bad, QuantStyle::Quest)),
                         doctest::Contains("does not divide"), Error);
}

TEST_CASE("QAT training (CPU, w4a4) learns with every optimizer and resumes only as QAT") {
    TempDir dir;
    for (const std::string name : {"adamw", "muon", "scion", "shampoo", "soap", "psgd"}) {
        CAPTURE(name);
        TrainOptions o = tiny_optimizer_run(dir, name, "cpu");
        o.qat.format = "w4a4";
        o.qat.hadamard = 64;
        std::ostringstream log;
        const TrainResult r = run_training(o, log);
        CAPTURE(log.str());
        CHECK(log.str().find("quantization-aware training: w4a4") != std::string::npos);
        CHECK(r.val_loss_end < r.val_loss_start - 0.3);
        if (name == "adamw") {
            TrainOptions again = o;
            again.steps = 50;
            again.resume = "auto";
            again.qat.format = "off";
            std::ostringstream log2;
            CHECK_THROWS_WITH_AS(run_training(again, log2), doctest::Contains("trained with --qat w4a4"), Error);
        }
    }
}
