// The GPU optimizers (optim/gpu_optimizer.*) against the CPU references over several steps on
// a small model's layout: square (q, k, v, out), tall (MLP up) and wide (MLP down) matrices
// and 1-D tensors; the bf16 weight copy; the state's round trip; and short training runs.
#include <sstream>

#include "gpu_helpers.hpp"
#include "train_helpers.hpp"
#include "optim/gpu_optimizer.hpp"
#include "optim/optimizer.hpp"
#include "train/trainer.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

ModelConfig small_gpt2() {
    ModelConfig c = preset_config("gpt2-tiny");
    c.vocab_size = 40;
    c.padded_vocab_size = 48;
    c.max_seq_len = 8;
    return c;
}

std::vector<double> slice(const std::vector<float>& v, size_t offset, size_t n, const std::vector<float>* minus = nullptr) {
    std::vector<double> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = double(v[offset + i]) - (minus ? double((*minus)[offset + i]) : 0.0);
    return out;
}

}  // namespace

TEST_CASE("GPU optimizers match the CPU references over several steps (adamw, muon, scion)") {
    REQUIRE_GPU();
    const ParamLayout layout = ParamLayout::build(small_gpt2());
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    for (const char* name : {"adamw", "muon", "scion"}) {
        CAPTURE(name);
        OptimizerConfig c;
        c.kind = parse_optimizer(name);
        std::mt19937_64 gen(seed);
        const std::vector<float> start = random_vector<float>(layout.total, gen);
        std::vector<float> cpu_params = start;
        auto cpu = make_cpu_optimizer(layout, c);
        GpuOptimizer gpu(layout, c);
        auto d_params = uploaded(start);
        auto d_copy = poisoned<bf16>(layout.total);
        const double lr = c.method_lr(), grad_scale = 0.7;
        for (int step = 0; step < 4; ++step) {
            std::vector<float> grads = random_vector<float>(layout.total, gen);
            auto d_grads = uploaded(grads);
            gpu.step(d_params.data(), d_grads.data(), lr, grad_scale, d_copy.data());
            cpu->step(cpu_params.data(), grads.data(), lr, grad_scale);
        }
        const std::vector<float> gpu_params = d_params.download();
        const std::vector<bf16> copy = d_copy.download();
        for (size_t i = 0; i < layout.total; ++i)
            REQUIRE(__bfloat162float(copy[i]) == __bfloat162float(__float2bfloat16(gpu_params[i])));
        // Newton-Schulz runs in bf16 on the GPU (as the reference) and in double on the CPU: 3e-2.
        const Routing routing = route_parameters(layout, c);
        // Element-wise rules: the final fp32 weights agree to a few roundings (the CPU rounds once
        // per step from double, the GPU after each fp32 operation), and the change to 1e-3.
        auto check_elementwise = [&](const TensorSlot& s) {
            CAPTURE(s.name);
            CHECK(relative_error(slice(gpu_params, s.offset, s.numel), slice(cpu_params, s.offset, s.numel)) < 1e-6);
            CHECK(relative_error(slice(gpu_params, s.offset, s.numel, &start), slice(cpu_params, s.offset, s.numel, &start)) < 1e-3);
        };
        for (const auto& s : routing.adamw) check_elementwise(s);
        for (const auto& s : routing.scion) check_elementwise(s);
        for (const auto& m : routing.matrices) {
            CAPTURE(m.name);
            const size_t n = size_t(m.rows) * m.cols;
            CHECK(relative_error(slice(gpu_params, m.offset, n, &start), slice(cpu_params, m.offset, n, &start)) < 3e-2);
        }
        // Same state tensors (names, shapes); fp32 momenta agree closely.
        const OptimizerState gpu_state = gpu.state(), cpu_state = cpu->state();
        REQUIRE(gpu_state.tensors.size() == cpu_state.tensors.size());
        CHECK(gpu_state.step == 4);
        for (const auto& t : cpu_state.tensors) {
            CAPTURE(t.name);
            const StateTensor* g = gpu_state.find(t.name);
            REQUIRE(g != nullptr);
            CHECK(g->shape == t.shape);
            CHECK(relative_error(g->values, t.values) < 1e-5);
        }
        // Round trip: a new GPU optimizer loaded from the state continues bit for bit.
        GpuOptimizer resumed(layout, c);
        resumed.load_state(gpu_state);
        auto d_params_b = uploaded(gpu_params);
        const std::vector<float> grads = random_vector<float>(layout.total, gen);
        auto d_grads = uploaded(grads);
        gpu.step(d_params.data(), d_grads.data(), lr, 1.0, nullptr);
        resumed.step(d_params_b.data(), d_grads.data(), lr, 1.0, nullptr);
        CHECK(d_params.download() == d_params_b.download());
    }
}

TEST_CASE("GPU optimizers: the GPU refuses the CPU-only methods with a message") {
    CHECK(GpuOptimizer::unsupported_reason(OptimizerKind::Muon).empty());
    CHECK(GpuOptimizer::unsupported_reason(OptimizerKind::Soap).find("CPU reference") != std::string::npos);
}

TEST_CASE("GPU training with muon and scion: the loss falls, nothing diverges") {
    REQUIRE_GPU();
    TempDir dir;
    for (const char* name : {"muon", "scion"}) {
        CAPTURE(name);
        const TrainOptions o = tiny_optimizer_run(dir, name, "cuda");
        std::ostringstream log;
        const TrainResult r = run_training(o, log);
        CAPTURE(log.str());
        CHECK(r.skipped_steps == 0);
        CHECK(r.val_loss_end < r.val_loss_start - 0.3);
    }
}
