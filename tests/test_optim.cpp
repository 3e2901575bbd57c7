// AdamW, learning-rate schedules and gradient clipping against values computed by hand
// from their definitions (see the comments for the arithmetic).
#include "core/error.hpp"
#include "helpers.hpp"
#include "optim/adamw.hpp"
#include "optim/optimizer.hpp"
#include "optim/grad_clip.hpp"
#include "optim/schedule.hpp"

using namespace qopt;

TEST_CASE("AdamW: two steps by hand (torch.optim.AdamW semantics)") {
    // p0 = 1, lr = 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.1.
    // Step 1, g = 0.5: m = 0.05, v = 0.00025, m^ = 0.5, v^ = 0.25
    //   p = 1 * (1 - 0.01) - 0.1 * 0.5 / (0.5 + 1e-8) = 0.890000002
    // Step 2, g = -0.25: m = 0.02, v = 0.00031225, m^ = 0.02 / 0.19, v^ = 0.00031225 / 0.001999
    //   p = 0.890000002 * 0.99 - 0.1 * m^ / (sqrt(v^) + 1e-8) = 0.85446629869
    AdamWConfig c;
    c.beta1 = 0.9;
    c.beta2 = 0.999;
    c.eps = 1e-8;
    c.weight_decay = 0.1;
    double p = 1.0, m = 0, v = 0;
    double g = 0.5;
    adamw_update_cpu(&p, &g, &m, &v, 1, 0.1, c, 1, true);
    CHECK(p == doctest::Approx(0.890000002).epsilon(1e-12));
    CHECK(m == doctest::Approx(0.05).epsilon(1e-12));
    CHECK(v == doctest::Approx(0.00025).epsilon(1e-12));
    g = -0.25;
    adamw_update_cpu(&p, &g, &m, &v, 1, 0.1, c, 2, true);
    CHECK(p == doctest::Approx(0.8544662986878463).epsilon(1e-12));
    // Without decay the same step leaves out only the (1 - lr * wd) factor.
    double q = 1.0, mq = 0, vq = 0, gq = 0.5;
    adamw_update_cpu(&q, &gq, &mq, &vq, 1, 0.1, c, 1, false);
    CHECK(q == doctest::Approx(1.0 - 0.1 * 0.5 / (0.5 + 1e-8)).epsilon(1e-12));
}

TEST_CASE("AdamW over a layout decays matrices and embeddings, not norms or biases") {
    ModelConfig config = preset_config("gpt2-tiny");
    config.vocab_size = 10;
    config.padded_vocab_size = 16;
    config.max_seq_len = 4;
    const ParamLayout layout = ParamLayout::build(config);
    OptimizerConfig c;
    c.adamw.weight_decay = 0.5;
    auto opt = make_cpu_optimizer(layout, c);
    std::vector<float> params(layout.total, 1.0f), grads(layout.total, 0.0f);
    opt->step(params.data(), grads.data(), 0.1, 1.0);  // zero gradient: only decay moves parameters
    CHECK(opt->step_count() == 1);
    for (const auto& t : layout.tensors) {
        CAPTURE(t.name);
        const float expected = decays_by_default(t) ? 1.0f - 0.1f * 0.5f : 1.0f;
        CHECK(params[t.offset] == doctest::Approx(expected));
        CHECK(decays_by_default(t) == (t.kind == ParamKind::Matrix || t.kind == ParamKind::Embedding ||
                                       t.kind == ParamKind::Position));
    }
}

TEST_CASE("schedules at hand-computed points") {
    LrSchedule s;
    s.max_lr = 1.0;
    s.warmup_steps = 10;
    s.total_steps = 110;
    s.final_fraction = 0.1;
    // Warmup: (s + 1) / 10.
    CHECK(s.at(0) == doctest::Approx(0.1));
    CHECK(s.at(9) == doctest::Approx(1.0));
    s.kind = ScheduleKind::Cosine;  // progress p = (s - 10) / 100
    CHECK(s.at(10) == doctest::Approx(1.0));
    CHECK(s.at(60) == doctest::Approx(0.55));                               // p = 0.5: 0.1 + 0.9 * 0.5
    CHECK(s.at(35) == doctest::Approx(0.1 + 0.9 * 0.5 * (1 + std::sqrt(0.5))));  // p = 0.25
    CHECK(s.at(110) == doctest::Approx(0.1));
    s.kind = ScheduleKind::Linear;
    CHECK(s.at(35) == doctest::Approx(0.775));  // 1 - 0.9 * 0.25
    CHECK(s.at(60) == doctest::Approx(0.55));
    s.kind = ScheduleKind::Wsd;  // decay over the last round(0.2 * 110) = 22 steps, from step 88
    s.decay_fraction = 0.2;
    CHECK(s.at(50) == doctest::Approx(1.0));
    CHECK(s.at(87) == doctest::Approx(1.0));
    CHECK(s.at(99) == doctest::Approx(0.55));  // (99 - 88) / 22 = 0.5
    CHECK(s.at(110) == doctest::Approx(0.1));
    s.kind = ScheduleKind::Constant;
    CHECK(s.at(100) == doctest::Approx(1.0));
    CHECK_THROWS_WITH_AS(parse_schedule("exp"), doctest::Contains("unknown schedule 'exp'"), Error);
    s.warmup_steps = 200;
    CHECK_THROWS_WITH_AS(s.validate(), doctest::Contains("--warmup-steps"), Error);
}

TEST_CASE("global-norm clipping") {
    std::vector<double> g = {3, 4};  // norm 5
    CHECK(clip_grad_norm_cpu(g.data(), 2, 10.0) == doctest::Approx(5.0));
    CHECK(g[0] == 3.0);
    CHECK(clip_grad_norm_cpu(g.data(), 2, 1.0) == doctest::Approx(5.0));
    CHECK(g[0] == doctest::Approx(0.6));
    CHECK(g[1] == doctest::Approx(0.8));
    std::vector<float> bad = {1.0f, NAN};
    CHECK(std::isnan(clip_grad_norm_cpu(bad.data(), 2, 1.0)));
    CHECK(bad[0] == 1.0f);  // untouched
}
