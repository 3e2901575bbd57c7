// The GPU optimizers (optim/gpu_optimizer.*) against the CPU references over several steps on
// a small model's layout: square (q, k, v, out), tall (MLP up) and wide (MLP down) matrices
// and 1-D tensors; the bf16 weight copy; the state's round trip; and short training runs.
// Also the dense linear algebra under Shampoo, SOAP and PSGD (kernels/linalg.cu) against
// optim/dense.hpp.
#include <algorithm>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <tuple>

#include "core/error.hpp"
#include "gpu_helpers.hpp"
#include "train_helpers.hpp"
#include "optim/dense.hpp"
#include "kernels/side_stream.hpp"
#include "optim/gpu_optimizer.hpp"
#include "optim/muon.hpp"
#include "optim/optimizer_kernels.hpp"
#include "optim/optimizer.hpp"
#include "optim/preconditioner_kernels.hpp"
#include "optim/psgd.hpp"
#include "train/trainer.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

// A layout of just these matrices, named "m<rows>x<cols>".
ParamLayout matrices_layout(const std::vector<std::pair<int, int>>& shapes) {
    ParamLayout layout;
    for (const auto& [rows, cols] : shapes)
        layout.append("m" + std::to_string(rows) + "x" + std::to_string(cols), {rows, cols}, ParamKind::Matrix);
    return layout;
}

std::vector<double> slice(const std::vector<float>& v, size_t offset, size_t n, const std::vector<float>* minus = nullptr) {
    std::vector<double> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = double(v[offset + i]) - (minus ? double((*minus)[offset + i]) : 0.0);
    return out;
}

}  // namespace

TEST_CASE("GPU optimizers match the CPU references over several steps (adamw, muon, scion)") {
    REQUIRE_GPU();
    const ParamLayout layout = ParamLayout::build(small_model("gpt2-tiny"));
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

TEST_CASE("GPU Newton-Schulz on a group of matrices, on a stream of its own, matches the CPU reference") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const MuonConfig config;
    SideStream side;
    // Square, wide (X X^T is the small square) and tall (X^T X), three matrices each, with
    // sizes that are not multiples of a GEMM tile.
    for (auto shape : {std::pair{72, 72}, std::pair{40, 136}, std::pair{136, 40}}) {
        const int rows = shape.first, cols = shape.second;
        CAPTURE(rows);
        CAPTURE(cols);
        const int count = 3;
        const size_t n = size_t(rows) * cols, s = size_t(std::min(rows, cols));
        // Each matrix normalised to Frobenius norm 1 (as the momentum/normalise pass leaves it),
        // rounded to bf16; the CPU starts from the same rounded values.
        std::vector<bf16> x(n * count);
        std::vector<double> rounded(n * count);
        for (int b = 0; b < count; ++b) {
            const std::vector<double> g = random_vector<double>(n, gen);
            double norm = 0;
            for (double v : g) norm += v * v;
            for (size_t i = 0; i < n; ++i) {
                x[b * n + i] = __float2bfloat16(float(g[i] / std::sqrt(norm)));
                rounded[b * n + i] = double(__bfloat162float(x[b * n + i]));
            }
        }
        auto d_x = uploaded(x);
        auto d_x2 = poisoned<bf16>(n * count), d_a = poisoned<bf16>(s * s * count), d_p = poisoned<bf16>(s * s * count);
        const bf16* result = newton_schulz_batched_gpu(d_x.data(), d_x2.data(), d_a.data(), d_p.data(), count, rows,
                                                       cols, config.ns_steps, float(config.ns_a), float(config.ns_b),
                                                       float(config.ns_c), side.after_default_stream());
        side.join_into_default_stream();
        // Five (odd) iterations end in x2.
        REQUIRE(result == d_x2.data());
        const std::vector<bf16> gpu = d_x2.download();
        for (int b = 0; b < count; ++b) {
            CAPTURE(b);
            std::vector<double> cpu(n);
            newton_schulz_cpu(cpu.data(), rounded.data() + b * n, rows, cols, config);
            std::vector<double> mine(n);
            for (size_t i = 0; i < n; ++i) mine[i] = double(__bfloat162float(gpu[b * n + i]));
            // bf16 products over five iterations against float64: 3e-2 (as the optimizer test).
            CHECK(relative_error(mine, cpu) < 3e-2);
        }
    }
}

namespace {

// Runs the GPU optimizer and the CPU reference side by side for `steps` steps of random
// gradients; returns the change of the parameters on each side and both states. With
// warm_steps, the CPU first takes that many steps alone and the GPU starts from its state (a
// CPU checkpoint resumed on the GPU).
struct SideBySide {
    std::vector<double> gpu_change, cpu_change;  // per routed matrix, concatenated
    OptimizerState gpu_state, cpu_state;
    EigenRefreshCounts gpu_refreshes, cpu_refreshes;  // Shampoo's kept-eigenbasis refreshes over the compared steps
};

SideBySide run_side_by_side(const ParamLayout& layout, const OptimizerConfig& c, int warm_steps, int steps,
                            uint64_t seed) {
    std::mt19937_64 gen(seed);
    std::vector<float> cpu_params = random_vector<float>(layout.total, gen);
    auto cpu = make_cpu_optimizer(layout, c);
    const double lr = c.method_lr(), grad_scale = 0.7;
    for (int step = 0; step < warm_steps; ++step) {
        std::vector<float> grads = random_vector<float>(layout.total, gen);
        cpu->step(cpu_params.data(), grads.data(), lr, grad_scale);
    }
    const std::vector<float> start = cpu_params;
    const EigenRefreshCounts cpu_warm_refreshes = cpu->eigen_refreshes();
    GpuOptimizer gpu(layout, c);
    if (warm_steps > 0) gpu.load_state(cpu->state());
    auto d_params = uploaded(start);
    auto d_copy = poisoned<bf16>(layout.total);
    for (int step = 0; step < steps; ++step) {
        std::vector<float> grads = random_vector<float>(layout.total, gen);
        auto d_grads = uploaded(grads);
        gpu.step(d_params.data(), d_grads.data(), lr, grad_scale, d_copy.data());
        cpu->step(cpu_params.data(), grads.data(), lr, grad_scale);
    }
    SideBySide r;
    const std::vector<float> gpu_params = d_params.download();
    const std::vector<bf16> copy = d_copy.download();
    for (const auto& m : route_parameters(layout, c).matrices)
        for (size_t i = m.offset; i < m.offset + size_t(m.rows) * m.cols; ++i) {
            r.gpu_change.push_back(double(gpu_params[i]) - start[i]);
            r.cpu_change.push_back(double(cpu_params[i]) - start[i]);
            REQUIRE(__bfloat162float(copy[i]) == __bfloat162float(__float2bfloat16(gpu_params[i])));
        }
    r.gpu_state = gpu.state();
    r.cpu_state = cpu->state();
    r.gpu_refreshes = gpu.eigen_refreshes();
    r.cpu_refreshes = {cpu->eigen_refreshes().kept - cpu_warm_refreshes.kept,
                       cpu->eigen_refreshes().decomposed - cpu_warm_refreshes.decomposed};
    // Round trip: a new GPU optimizer loaded from the state continues bit for bit.
    GpuOptimizer resumed(layout, c);
    resumed.load_state(r.gpu_state);
    auto d_params_b = uploaded(gpu_params);
    auto d_grads = uploaded(random_vector<float>(layout.total, gen));
    gpu.step(d_params.data(), d_grads.data(), lr, 1.0, nullptr);
    resumed.step(d_params_b.data(), d_grads.data(), lr, 1.0, nullptr);
    CHECK(d_params.download() == d_params_b.download());
    return r;
}

}  // namespace

namespace {

// The GPU state has every CPU state tensor, in its shape; those whose name ends in one of
// `compared_suffixes` (the basis-free ones) agree value by value.
void check_states_agree(const SideBySide& r, const std::vector<std::string>& compared_suffixes) {
    REQUIRE(r.gpu_state.tensors.size() == r.cpu_state.tensors.size());
    for (const auto& t : r.cpu_state.tensors) {
        CAPTURE(t.name);
        const StateTensor* g = r.gpu_state.find(t.name);
        REQUIRE(g != nullptr);
        CHECK(g->shape == t.shape);
        const std::string suffix = t.name.substr(t.name.rfind('.') + 1);
        if (std::find(compared_suffixes.begin(), compared_suffixes.end(), suffix) != compared_suffixes.end())
            CHECK(relative_error(g->values, t.values) < 2e-3);
    }
}

}  // namespace

TEST_CASE("GPU Shampoo, SOAP and PSGD match the CPU references over several steps") {
    REQUIRE_GPU();
    const ParamLayout layout = ParamLayout::build(small_model("gpt2-tiny"));
    ModelConfig square_config = small_model("gpt2-tiny");
    square_config.d_ff = square_config.d_model;
    const ParamLayout square_layout = ParamLayout::build(square_config);
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    // The GPU computes in fp32 (eigendecompositions and QR in cuSOLVER), the CPU in double. A
    // factor of a tall or wide gradient is rank-deficient for its first steps, and then its
    // null space has no preferred basis: SOAP's eigenbasis there, and the part of Shampoo's
    // roots there, follow rounding and legitimately differ between the two. So most cases
    // start the GPU from the CPU's state after 6 steps (factors of full rank by then, as a
    // CPU checkpoint resumed on the GPU), and the first steps from scratch are compared on
    // square matrices, whose factors have full rank from the first step. SOAP sorts its basis
    // by estimated eigenvalues before each QR; two estimates within rounding of each other may
    // sort differently on the two sides, and QR is not permutation-equivariant, so SOAP's bases
    // (and exp_avg_sq, whose axes follow them) can part slightly: up to 5.5e-3 on the weight
    // changes over nine runs with fresh seeds (most runs below 3e-4), hence 1e-2 there.
    struct Case {
        std::string label;
        const char* optimizer;
        std::function<void(OptimizerConfig&)> setup;
        bool square;
        int warm_steps, steps;
        double bound;  // on the weight changes' relative difference
        std::vector<std::string> compared_state;  // suffixes compared value by value (basis-free state)
    };
    const std::vector<Case> cases = {
        {"shampoo from scratch", "shampoo", [](OptimizerConfig& c) { c.shampoo.precondition_frequency = 2; }, true, 0, 5, 2e-3,
         {"left", "right", "left_root", "right_root", "filtered", "graft_sq"}},
        {"shampoo", "shampoo", [](OptimizerConfig& c) { c.shampoo.precondition_frequency = 2; }, false, 6, 4, 2e-3,
         {"left", "right", "left_root", "right_root", "filtered", "graft_sq"}},
        {"shampoo blocks 48, momentum, nesterov, EMA factors", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.block_size = 48;
             c.shampoo.precondition_frequency = 1;
             c.shampoo.momentum = 0.5;
             c.shampoo.nesterov = true;
             c.shampoo.beta2 = 0.99;
         },
         false, 6, 3, 2e-3, {"left", "right", "left_root", "right_root", "momentum"}},
        // The reference's other filtered-gradient, momentum and weight-decay settings: beta3 (a
        // NAdam-like step), no bias correction, dampened Nesterov momentum, l2 decay (into the
        // gradients, so into the factors); and the decay independent of the learning rate
        // (alpha = wd / peak lr = 0.1 with wd 1e-4).
        {"shampoo beta3, no bias correction, dampened Nesterov momentum, l2 decay", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.precondition_frequency = 2;
             c.shampoo.beta3 = 0.81;
             c.shampoo.bias_correction = false;
             c.shampoo.momentum = 0.5;
             c.shampoo.nesterov = true;
             c.shampoo.dampening = 0.3;
             c.shampoo.decay_type = ShampooDecay::l2;
             c.adamw.weight_decay = 0.1;
         },
         false, 6, 4, 2e-3, {"left", "right", "left_root", "right_root", "filtered", "graft_sq", "momentum"}},
        {"shampoo, weight decay independent of the learning rate", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.precondition_frequency = 2;
             c.shampoo.decay_type = ShampooDecay::independent;
             c.adamw.weight_decay = 1e-4;
         },
         false, 6, 4, 2e-3, {"left", "right", "left_root", "right_root", "filtered", "graft_sq"}},
        // The reference's other grafting methods: RMSprop without its weighting factor, AdaGrad
        // and SGD.
        {"shampoo, RMSprop grafting without the weighting factor", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.precondition_frequency = 2;
             c.shampoo.grafting = ShampooGrafting::rmsprop;
             c.shampoo.graft_beta2 = 0.99;
             c.shampoo.graft_drop_weighting = true;
         },
         false, 6, 4, 2e-3, {"left", "right", "left_root", "right_root", "filtered", "graft_sq"}},
        {"shampoo, AdaGrad grafting", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.precondition_frequency = 2;
             c.shampoo.grafting = ShampooGrafting::adagrad;
         },
         false, 6, 4, 2e-3, {"left", "right", "left_root", "right_root", "filtered", "graft_sq"}},
        {"shampoo, SGD grafting", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.precondition_frequency = 2;
             c.shampoo.grafting = ShampooGrafting::sgd;
         },
         false, 6, 4, 2e-3, {"left", "right", "left_root", "right_root", "filtered"}},
        {"shampoo without grafting", "shampoo",
         [](OptimizerConfig& c) { c.shampoo.precondition_frequency = 1; c.shampoo.grafting = ShampooGrafting::none; }, false, 6, 2, 2e-3,
         {"left_root", "right_root"}},
        // A kept eigenbasis (the reference's EigendecomposedShampoo): tolerance 1 keeps the identity
        // basis for good (the roots come from the factors' diagonals); 1e-9 is never met in fp32,
        // so every refresh decomposes again and keeps the new basis; the QR algorithm from it.
        {"shampoo, kept eigenbasis, tolerance 1 (diagonal roots)", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.precondition_frequency = 2;
             c.shampoo.eigen_tolerance = 1.0;
         },
         false, 6, 4, 2e-3,
         {"left", "right", "left_root", "right_root", "left_eigenvectors", "left_eigenvalues", "right_eigenvalues"}},
        {"shampoo, kept eigenbasis, tolerance 1e-9 (decomposed at every refresh)", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.precondition_frequency = 2;
             c.shampoo.eigen_tolerance = 1e-9;
         },
         false, 6, 4, 2e-3, {"left_root", "right_root", "left_eigenvalues", "right_eigenvalues"}},
        {"shampoo, QR algorithm, 2 iterations per refresh", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.precondition_frequency = 2;
             c.shampoo.eigen_method = ShampooEigenMethod::qr;
             c.shampoo.qr_iterations = 2;
         },
         true, 6, 4, 2e-3, {"left_root", "right_root", "left_eigenvalues", "right_eigenvalues"}},
        // A refresh lag: the roots computed on the side stream, taken 2 steps later (at 6; the
        // refresh at 8 is still pending when the state is compared and round-tripped, and taken
        // at the round trip's step 10); from a CPU state saved with its roots pending (refresh
        // at 6, taken at 7).
        {"shampoo, refresh lag 2, from scratch", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.precondition_frequency = 4;
             c.shampoo.refresh_lag = 2;
         },
         true, 0, 9, 2e-3,
         {"left", "right", "left_root", "right_root", "pending_left_root", "pending_right_root", "filtered", "graft_sq"}},
        {"shampoo, refresh lag 1, from a CPU state with pending roots", "shampoo",
         [](OptimizerConfig& c) {
             c.shampoo.precondition_frequency = 2;
             c.shampoo.refresh_lag = 1;
         },
         false, 6, 4, 2e-3,
         {"left", "right", "left_root", "right_root", "pending_left_root", "pending_right_root", "filtered", "graft_sq"}},
        {"soap from scratch", "soap", [](OptimizerConfig& c) { c.soap.precondition_frequency = 2; }, true, 0, 6,
         1e-2, {"left", "right"}},
        {"soap", "soap", [](OptimizerConfig& c) { c.soap.precondition_frequency = 2; }, false, 6, 5, 1e-2,
         {"left", "right"}},
        // One-sided SOAP: the MLP's 256-long side is beyond max_precond_dim 100, so it has no
        // factor (the up projection's left side, the down projection's right).
        {"soap one-sided (max_precond_dim 100)", "soap",
         [](OptimizerConfig& c) {
             c.soap.precondition_frequency = 2;
             c.soap.max_precond_dim = 100;
         },
         false, 6, 5, 1e-2, {"left", "right"}},
        {"soap normalized, shampoo beta, no bias correction", "soap",
         [](OptimizerConfig& c) {
             c.soap.precondition_frequency = 1;
             c.soap.normalize_grads = true;
             c.soap.shampoo_beta = 0.9;
             c.soap.correct_bias = false;
         },
         false, 6, 3, 1e-2, {"left", "right"}},
        {"psgd", "psgd", [](OptimizerConfig&) {}, false, 0, 4, 2e-3, {"momentum", "q_left", "q_right"}},
        {"psgd at update probability 0.5 (Q^T Q formed and kept between updates)", "psgd",
         [](OptimizerConfig& c) { c.psgd.update_prob_max = 0.5; }, false, 0, 6, 2e-3, {"momentum", "q_left", "q_right"}},
        {"psgd balanced, gradient into the update", "psgd",
         [](OptimizerConfig& c) {
             c.psgd.balance_probability = 1.0;
             c.psgd.momentum_into_precond_update = false;
         },
         false, 6, 3, 2e-3, {"momentum", "q_left", "q_right"}},
    };
    for (const Case& k : cases) {
        CAPTURE(k.label);
        OptimizerConfig c;
        c.kind = parse_optimizer(k.optimizer);
        k.setup(c);
        const SideBySide r = run_side_by_side(k.square ? square_layout : layout, c, k.warm_steps, k.steps, seed);
        const double error = relative_error(r.gpu_change, r.cpu_change);
        MESSAGE(k.label << ": relative difference of the weight changes " << error);
        CHECK(error < k.bound);
        CHECK(r.gpu_state.step == k.warm_steps + k.steps);
        check_states_agree(r, k.compared_state);
    }
}

TEST_CASE("GPU Shampoo with a kept eigenbasis decomposes just the factors outside the tolerance, as the CPU does") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    // A 48 x 160 matrix in blocks of 48: seven 48 x 48 factors and one 16 x 16 per refresh
    // (steps 8 and 10). On the CPU the ratios ||B - diag B|| / ||B|| are, at step 8, 0.161-0.172
    // for the six square blocks' factors, ~0.25 for the 48 x 16 block's left one and ~0.09 for
    // the 16 x 16; at step 10, 0.13-0.137, ~0.22 and ~0.1. At tolerance 0.15 step 8 decomposes
    // (nearly) all seven 48 x 48 factors and step 10 about one of them (symmetric_eigen_listed_gpu
    // with a short list): 7-8 kept and 8-9 decomposed on the seeds tried. The counts come from the
    // flags the GPU acted on, so they also check that a smaller batch reads only its own.
    OptimizerConfig c;
    c.kind = OptimizerKind::Shampoo;
    c.shampoo.block_size = 48;
    c.shampoo.precondition_frequency = 2;
    c.shampoo.eigen_tolerance = 0.15;
    const SideBySide r = run_side_by_side(matrices_layout({{48, 160}}), c, 6, 4, seed);
    const double error = relative_error(r.gpu_change, r.cpu_change);
    MESSAGE("shampoo, tolerance 0.15: " << r.gpu_refreshes.kept << " factor refreshes kept, "
                                        << r.gpu_refreshes.decomposed << " decomposed; relative difference of the weight changes "
                                        << error);
    CHECK(error < 2e-3);
    CHECK(r.gpu_refreshes.kept == r.cpu_refreshes.kept);
    CHECK(r.gpu_refreshes.decomposed == r.cpu_refreshes.decomposed);
    // More than the one 16 x 16 factor kept and the 48 x 16 block's left one decomposed: a 48 x
    // 48 batch was mixed.
    CHECK(r.gpu_refreshes.kept > 2);
    CHECK(r.gpu_refreshes.decomposed > 2);
    check_states_agree(r, {"left_root", "right_root", "left_eigenvalues", "right_eigenvalues"});
}

TEST_CASE("GPU PSGD with wide factors (their products by blocks of the triangle) matches the CPU reference") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    // A tall and a wide matrix at update probability 1: 1024-wide left and right factors take
    // the blocked products (kTriangularProductMin in optim/gpu_psgd.cpp), the 40-wide ones the
    // batched GEMM, and the preconditioned update is chained through the factors. Then a 1024 x 256
    // matrix at probability 0.1 (an update every 10 steps), where forming Q^T Q pays off
    // (psgd_products_pay_off): formed at step 1, kept, formed again after the update at step 10.
    struct Case {
        std::vector<std::pair<int, int>> shapes;
        double update_probability;
        int steps;
    };
    for (const Case& k : {Case{{{1024, 40}, {40, 1024}}, 1.0, 3}, Case{{{1024, 256}}, 0.1, 11}}) {
        CAPTURE(k.update_probability);
        const ParamLayout layout = matrices_layout(k.shapes);
        OptimizerConfig c;
        c.kind = OptimizerKind::Psgd;
        c.psgd.update_prob_max = k.update_probability;
        const SideBySide r = run_side_by_side(layout, c, 0, k.steps, seed);
        const double error = relative_error(r.gpu_change, r.cpu_change);
        MESSAGE("psgd, 1024-wide factors, update probability " << k.update_probability
                                                               << ": relative difference of the weight changes " << error);
        CHECK(error < 2e-3);
        check_states_agree(r, {"momentum", "q_left", "q_right"});
    }
}

TEST_CASE("GPU Shampoo, SOAP and PSGD with --precond-tf32 stay within TF32 rounding of the CPU references") {
    REQUIRE_GPU();
    const ParamLayout layout = ParamLayout::build(small_model("gpt2-tiny"));
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    // TF32 keeps 10 mantissa bits of each product's inputs (relative rounding 5e-4); a step
    // chains a few products, so the weights' changes agree to a few 1e-3 (fp32: 2e-3 above).
    for (const std::string name : {"shampoo", "soap", "psgd"}) {
        CAPTURE(name);
        OptimizerConfig c;
        c.kind = parse_optimizer(name);
        c.precond_tf32 = true;
        c.shampoo.precondition_frequency = 1;
        c.soap.precondition_frequency = 1;
        const SideBySide r = run_side_by_side(layout, c, name == "psgd" ? 0 : 6, 3, seed);
        const double error = relative_error(r.gpu_change, r.cpu_change);
        MESSAGE(name << " with TF32: relative difference of the weight changes " << error);
        CHECK(error < 2e-2);
    }
}

namespace {

std::vector<float> to_floats(const Dense& d) {
    return std::vector<float>(d.values.begin(), d.values.end());
}

Dense from_floats(const std::vector<float>& v, size_t offset, int rows, int cols) {
    Dense d(rows, cols);
    for (size_t i = 0; i < d.values.size(); ++i) d.values[i] = v[offset + i];
    return d;
}

Dense random_matrix(int rows, int cols, std::mt19937_64& gen) {
    std::normal_distribution<double> normal;
    Dense d(rows, cols);
    for (double& x : d.values) x = float(normal(gen));
    return d;
}

double max_abs(const Dense& a) {
    double m = 0;
    for (double x : a.values) m = std::max(m, std::abs(x));
    return m;
}

// A QR's Q is unique up to its columns' signs: the largest |gpu - cpu| over the first `columns`
// columns once each GPU column takes the sign of the CPU one (decided at the CPU column's
// largest entry).
double max_difference_up_to_column_signs(const Dense& gpu_q, const Dense& cpu_q, int columns) {
    double largest = 0;
    for (int c = 0; c < columns; ++c) {
        int anchor = 0;
        for (int r = 1; r < cpu_q.rows; ++r)
            if (std::abs(cpu_q(r, c)) > std::abs(cpu_q(anchor, c))) anchor = r;
        const double sign = gpu_q(anchor, c) * cpu_q(anchor, c) < 0 ? -1.0 : 1.0;
        for (int r = 0; r < cpu_q.rows; ++r) largest = std::max(largest, std::abs(gpu_q(r, c) - sign * cpu_q(r, c)));
    }
    return largest;
}

// How far q [n, n] is from a QR's Q of a: max |Q^T Q - I| and the largest entry below the
// diagonal of R = Q^T a relative to its column's length.
struct QrDefects {
    double orthogonality = 0, triangularity = 0;
};
QrDefects qr_defects(const Dense& q, const Dense& a) {
    QrDefects d;
    const Dense gram = matmul(q, q, true, false), r = matmul(q, a, true, false);
    for (int i = 0; i < q.cols; ++i)
        for (int j = 0; j < q.cols; ++j) d.orthogonality = std::max(d.orthogonality, std::abs(gram(i, j) - (i == j)));
    for (int j = 0; j < a.cols; ++j) {
        double length = 0;
        for (int i = 0; i < a.rows; ++i) length += a(i, j) * a(i, j);
        length = std::sqrt(length);
        for (int i = j + 1; i < a.rows; ++i)
            if (length > 0) d.triangularity = std::max(d.triangularity, std::abs(r(i, j)) / length);
    }
    return d;
}

}  // namespace

TEST_CASE("GPU dense linear algebra: batched eigendecomposition, Householder QR, triangular solves and products, Gram products") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (int n : {1, 5, 33, 100}) {
        CAPTURE(n);
        const int batch = 3;
        std::vector<Dense> inputs;
        std::vector<float> host;
        for (int b = 0; b < batch; ++b) {
            const Dense x = random_matrix(n, n + 2, gen);
            inputs.push_back(matmul(x, x, false, true));  // symmetric positive definite
            const std::vector<float> f = to_floats(inputs.back());
            host.insert(host.end(), f.begin(), f.end());
        }
        auto d_a = uploaded(host);
        auto vectors = poisoned<float>(host.size()), values = poisoned<float>(size_t(n) * batch);
        auto scratch = poisoned<float>(host.size()), q = poisoned<float>(host.size());
        symmetric_eigen_batched_gpu(vectors.data(), values.data(), d_a.data(), n, batch, scratch.data());
        householder_q_batched_gpu(q.data(), d_a.data(), n, batch, scratch.data());
        const std::vector<float> gv = vectors.download(), gl = values.download(), gq = q.download();
        // Matrix b's eigenpairs in (gv, gl) against the CPU's.
        auto check_eigenpairs = [&](const std::vector<float>& gv, const std::vector<float>& gl, int b) {
            CAPTURE(b);
            const Dense& a = inputs[size_t(b)];
            const SymmetricEigen e = symmetric_eigen(a);
            const double scale = e.values[0];
            for (int j = 0; j < n; ++j) CHECK(std::abs(gl[size_t(b) * n + j] - e.values[size_t(j)]) < 1e-5 * scale);
            // V diag(values) V^T reproduces a, and V is orthogonal (eigenvectors are unique only up to sign).
            const Dense v = from_floats(gv, size_t(b) * n * n, n, n);
            Dense scaled = v;
            for (int r = 0; r < n; ++r)
                for (int c = 0; c < n; ++c) scaled(r, c) *= gl[size_t(b) * n + c];
            Dense diff = matmul(scaled, v, false, true);
            for (size_t i = 0; i < diff.values.size(); ++i) diff.values[i] -= a.values[i];
            CHECK(max_abs(diff) < 1e-5 * scale);
        };
        for (int b = 0; b < batch; ++b) {
            const Dense& a = inputs[size_t(b)];
            check_eigenpairs(gv, gl, b);
            // Q: the CPU's Householder Q up to the signs of its columns.
            const Dense gpu_q = from_floats(gq, size_t(b) * n * n, n, n), cpu_q = householder_q(a);
            CHECK(max_difference_up_to_column_signs(gpu_q, cpu_q, n) < 1e-3);
        }
        // Only the listed matrices, from a separate input and in place (a is the scratch): their
        // eigenpairs at their places in the batch.
        for (const std::vector<int>& listed : {std::vector<int>{1, 2}, std::vector<int>{0, 2}, std::vector<int>{}}) {
            CAPTURE(listed.size());
            auto listed_vectors = poisoned<float>(host.size()), listed_values = poisoned<float>(size_t(n) * batch);
            auto separate_scratch = poisoned<float>(host.size()), in_place = uploaded(host);
            symmetric_eigen_listed_gpu(listed_vectors.data(), listed_values.data(), d_a.data(), n, batch, listed,
                                       separate_scratch.data());
            for (int b : listed) check_eigenpairs(listed_vectors.download(), listed_values.download(), b);
            symmetric_eigen_listed_gpu(listed_vectors.data(), listed_values.data(), in_place.data(), n, batch, listed,
                                       in_place.data());
            for (int b : listed) check_eigenpairs(listed_vectors.download(), listed_values.download(), b);
        }
        CHECK_THROWS_AS(symmetric_eigen_listed_gpu(vectors.data(), values.data(), d_a.data(), n, batch, {2, 1},
                                                   scratch.data()),
                        Error);
        CHECK_THROWS_AS(symmetric_eigen_listed_gpu(vectors.data(), values.data(), d_a.data(), n, batch, {batch},
                                                   scratch.data()),
                        Error);

        // Triangular solves with well-conditioned upper-triangular u.
        std::vector<float> u_host, x_host;
        std::vector<Dense> us, xs;
        for (int b = 0; b < batch; ++b) {
            Dense u = random_matrix(n, n, gen);
            for (int i = 0; i < n; ++i) {
                for (int j = 0; j < i; ++j) u(i, j) = 0;
                u(i, i) = 3 + std::abs(u(i, i));
                for (int j = i + 1; j < n; ++j) u(i, j) *= 0.3;
            }
            us.push_back(u);
            xs.push_back(random_matrix(n, 4, gen));  // [n, 4]
            const std::vector<float> uf = to_floats(u), xf = to_floats(xs.back());
            u_host.insert(u_host.end(), uf.begin(), uf.end());
            x_host.insert(x_host.end(), xf.begin(), xf.end());
        }
        auto d_u = uploaded(u_host), d_left = uploaded(x_host);
        solve_upper_transposed_left_batched_gpu(d_left.data(), d_u.data(), n, 4, batch);  // u^-T x
        std::vector<float> xt_host;  // x^T [4, n] per matrix
        for (const Dense& x : xs) {
            const std::vector<float> f = to_floats(x.transposed());
            xt_host.insert(xt_host.end(), f.begin(), f.end());
        }
        auto d_right = uploaded(xt_host);
        solve_upper_right_batched_gpu(d_right.data(), d_u.data(), 4, n, batch);  // x^T u^-1
        // Products with upper-triangular u (zeros below the diagonal): u b and u^T b, b [n, 4], and
        // b u and b u^T, b [4, n]; by the default blocks (one block here) and by blocks of 16
        // (several, the last one partial).
        auto d_x = uploaded(x_host), d_xt = uploaded(xt_host);
        for (const int block : {0, 16}) {  // 0: the default (one block at these sizes)
            CAPTURE(block);
            auto d_product = poisoned<float>(x_host.size()), d_product_t = poisoned<float>(x_host.size());
            auto d_right_product = poisoned<float>(x_host.size()), d_right_product_t = poisoned<float>(x_host.size());
            upper_triangular_product_batched_gpu(d_product.data(), d_u.data(), false, d_x.data(), n, 4, batch, false,
                                                 block);
            upper_triangular_product_batched_gpu(d_product_t.data(), d_u.data(), true, d_x.data(), n, 4, batch, false,
                                                 block);
            product_with_upper_triangular_batched_gpu(d_right_product.data(), d_xt.data(), d_u.data(), false, 4, n,
                                                      batch, false, block);
            product_with_upper_triangular_batched_gpu(d_right_product_t.data(), d_xt.data(), d_u.data(), true, 4, n,
                                                      batch, false, block);
            const std::vector<float> products[4] = {d_product.download(), d_product_t.download(),
                                                    d_right_product.download(), d_right_product_t.download()};
            for (int b = 0; b < batch; ++b) {
                const Dense& u = us[size_t(b)];
                const Dense& x = xs[size_t(b)];
                const Dense xt = x.transposed();
                const Dense expected[4] = {matmul(u, x), matmul(u, x, true, false), matmul(xt, u),
                                           matmul(xt, u, false, true)};
                const size_t at = size_t(b) * 4 * n;
                for (int kind = 0; kind < 4; ++kind) {
                    CAPTURE(kind);
                    CHECK(relative_error(std::vector<float>(products[kind].begin() + long(at),
                                                            products[kind].begin() + long(at + 4 * n)),
                                         expected[kind].values) < 1e-5);
                }
            }
        }
        // Gram products: d = 0.7 op(x) op(x)^T + 0.4 d on a symmetric d, op(x) [n, n + 3].
        {
            const int k = n + 3;
            std::vector<float> x_rows, x_columns, d_host;
            std::vector<Dense> x_list, d_list;
            for (int b = 0; b < batch; ++b) {
                x_list.push_back(random_matrix(n, k, gen));
                const Dense s = random_matrix(n, n, gen);
                Dense sym = matmul(s, s, false, true);
                d_list.push_back(sym);
                const std::vector<float> xf = to_floats(x_list.back()), xt = to_floats(x_list.back().transposed()),
                                         df = to_floats(sym);
                x_rows.insert(x_rows.end(), xf.begin(), xf.end());
                x_columns.insert(x_columns.end(), xt.begin(), xt.end());
                d_host.insert(d_host.end(), df.begin(), df.end());
            }
            auto d_rows = uploaded(x_rows), d_columns = uploaded(x_columns);
            // syrk per matrix (block -1), then the upper triangle's block rows in blocks of 16 (uneven
            // last block for n = 33, 100) and of the default size (one block here), fp32 and TF32.
            for (int block : {-1, 16, 0})
                for (bool tf32 : {false, true}) {
                    if (block < 0 && tf32) continue;
                    CAPTURE(block);
                    CAPTURE(tf32);
                    auto gram = uploaded(d_host), gram_t = uploaded(d_host);
                    if (block < 0) {
                        symmetric_gram_batched_gpu(gram.data(), d_rows.data(), false, n, k, batch, 0.7f, 0.4f);
                        symmetric_gram_batched_gpu(gram_t.data(), d_columns.data(), true, n, k, batch, 0.7f, 0.4f);
                    } else {
                        symmetric_gram_blocked_batched_gpu(gram.data(), d_rows.data(), false, n, k, batch, 0.7f, 0.4f,
                                                           tf32, block);
                        symmetric_gram_blocked_batched_gpu(gram_t.data(), d_columns.data(), true, n, k, batch, 0.7f,
                                                           0.4f, tf32, block);
                    }
                    const std::vector<float> g1 = gram.download(), g2 = gram_t.download();
                    const double bound = tf32 ? 2e-3 : 1e-5;
                    for (int b = 0; b < batch; ++b) {
                        Dense expected = matmul(x_list[size_t(b)], x_list[size_t(b)], false, true);
                        for (size_t i = 0; i < expected.values.size(); ++i)
                            expected.values[i] = 0.7 * expected.values[i] + 0.4 * d_list[size_t(b)].values[i];
                        const size_t at = size_t(b) * n * n;
                        const std::vector<float> m1(g1.begin() + long(at), g1.begin() + long(at + size_t(n) * n)),
                            m2(g2.begin() + long(at), g2.begin() + long(at + size_t(n) * n));
                        CHECK(relative_error(m1, expected.values) < bound);
                        CHECK(relative_error(m2, expected.values) < bound);
                        for (int i = 0; i < n; ++i)  // exactly symmetric
                            for (int j = 0; j < i; ++j) REQUIRE(m1[size_t(i) * n + j] == m1[size_t(j) * n + i]);
                    }
                }
            if (n > 1) {  // the block rows' share of a GEMM's multiply-adds: 1 for one block, (n + 1) / (2 n) for blocks of 1
                CHECK(upper_triangular_product_fraction(n, n) == 1.0);
                CHECK(upper_triangular_product_fraction(n, 1) == doctest::Approx(double(n + 1) / (2.0 * n)));
            }
        }
        const std::vector<float> left = d_left.download(), right = d_right.download();
        for (int b = 0; b < batch; ++b) {
            const Dense expected_right = solve_upper_right(xs[size_t(b)].transposed(), us[size_t(b)]);  // [4, n]
            const Dense expected_left = expected_right.transposed();                                // u^-T x
            CHECK(relative_error(std::vector<float>(right.begin() + long(size_t(b) * 4 * n), right.begin() + long(size_t(b + 1) * 4 * n)),
                                 expected_right.values) < 1e-5);
            CHECK(relative_error(std::vector<float>(left.begin() + long(size_t(b) * 4 * n), left.begin() + long(size_t(b + 1) * 4 * n)),
                                 expected_left.values) < 1e-5);
        }
    }
}

TEST_CASE("GPU coupled inverse Newton roots match the CPU reference's, the whole batch at once") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    // Five SPD matrices of 40 x 40 (x x^T / n + I / 2, one scaled by 1e3: z normalises each
    // matrix on its own), root 4 and 2; fp32 reaches max |M - I| of a few 1e-6, so 1e-5.
    const int n = 40, batch = 5;
    for (int root : {4, 2}) {
        CAPTURE(root);
        std::vector<float> a(size_t(batch) * n * n);
        std::vector<Dense> dense;
        for (int b = 0; b < batch; ++b) {
            Dense x(n, n);
            x.values = random_vector<double>(x.values.size(), gen);
            Dense m = matmul(x, x, false, true);
            for (double& v : m.values) v = v / n * (b == 2 ? 1e3 : 1.0);
            for (int i = 0; i < n; ++i) m(i, i) += b == 2 ? 500.0 : 0.5;
            for (size_t i = 0; i < m.values.size(); ++i) a[size_t(b) * n * n + i] = float(m.values[i]);
            dense.push_back(dense_from(a.data() + size_t(b) * n * n, n, n));
        }
        auto d_a = uploaded(a);
        auto d_x = poisoned<float>(a.size()), d_scratch = poisoned<float>(5 * a.size());
        const NewtonBatchReport report = coupled_newton_inverse_root_batched_gpu(d_x.data(), d_a.data(), n, batch, root,
                                                                                 1e-3, 100, 1e-5, d_scratch.data());
        CHECK(report.converged == batch);
        CHECK(report.iterations < 40);
        const std::vector<float> gpu = d_x.download();
        for (int b = 0; b < batch; ++b) {
            CAPTURE(b);
            const NewtonRoot cpu = coupled_newton_inverse_root(dense[size_t(b)], root, 1e-3, 100, 1e-12);
            const std::vector<double> mine(gpu.begin() + long(b) * n * n, gpu.begin() + long(b + 1) * n * n);
            CHECK(relative_error(mine, cpu.root.values) < 1e-4);
        }
    }
    // A NaN in one matrix of the batch: that matrix never reads as converged (its distance to I
    // is NaN, whichever thread meets it), the others still do, and the loop runs to its limit.
    std::vector<float> a(size_t(3) * n * n);
    for (int b = 0; b < 3; ++b) {
        Dense x(n, n);
        x.values = random_vector<double>(x.values.size(), gen);
        Dense m = matmul(x, x, false, true);
        for (int i = 0; i < n; ++i) m(i, i) += 0.5 * n;
        for (size_t i = 0; i < m.values.size(); ++i) a[size_t(b) * n * n + i] = float(m.values[i] / n);
    }
    a[size_t(n) * n + size_t(n) * n / 2 + 3] = NAN;
    auto d_a = uploaded(a);
    auto d_x = poisoned<float>(a.size()), d_scratch = poisoned<float>(5 * a.size());
    const NewtonBatchReport report =
        coupled_newton_inverse_root_batched_gpu(d_x.data(), d_a.data(), n, 3, 4, 1e-3, 30, 1e-5, d_scratch.data());
    CHECK(report.converged == 2);
    CHECK(report.iterations == 30);
}

TEST_CASE("GPU product of two upper-triangular matrices by blocks matches the CPU's matmul") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    // The default blocks (triangular_product_block: 256 below 2048, then 512): 300 in two (the
    // last partial), 1024 in exactly four, 2100 in five (the last partial); and 300 in blocks of
    // 64 (five, the last partial).
    for (const auto& [n, block] : {std::pair{300, 0}, std::pair{1024, 0}, std::pair{2100, 0}, std::pair{300, 64}}) {
        CAPTURE(n);
        CAPTURE(block);
        const int batch = 2;
        std::vector<float> u_host, q_host;
        std::vector<Dense> us, qs;
        for (int b = 0; b < batch; ++b) {
            Dense u = random_matrix(n, n, gen), q = random_matrix(n, n, gen);
            for (int i = 0; i < n; ++i)
                for (int j = 0; j < i; ++j) u(i, j) = q(i, j) = 0;
            us.push_back(u);
            qs.push_back(q);
            const std::vector<float> uf = to_floats(u), qf = to_floats(q);
            u_host.insert(u_host.end(), uf.begin(), uf.end());
            q_host.insert(q_host.end(), qf.begin(), qf.end());
        }
        auto d_u = uploaded(u_host), d_q = uploaded(q_host);
        auto d_out = poisoned<float>(u_host.size());
        upper_triangular_square_product_batched_gpu(d_out.data(), d_u.data(), d_q.data(), n, batch, false, block);
        const std::vector<float> out = d_out.download();
        for (int b = 0; b < batch; ++b) {
            const size_t at = size_t(b) * n * n;
            const std::vector<float> got(out.begin() + long(at), out.begin() + long(at + size_t(n) * n));
            CHECK(relative_error(got, matmul(us[size_t(b)], qs[size_t(b)]).values) < 1e-5);
            bool lower_zero = true;
            for (int i = 0; i < n; ++i)
                for (int j = 0; j < i; ++j) lower_zero = lower_zero && got[size_t(i) * n + j] == 0.0f;
            CHECK(lower_zero);
        }
    }
}

TEST_CASE("GPU Cholesky QR gives the CPU reference's Householder Q up to signs, also for ill-conditioned and singular inputs") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (int n : {1, 7, 64, 200}) {
        CAPTURE(n);
        // 0: random. 1: random with column lengths spread over eight decades (condition ~1e8; the
        // same Q as unscaled). 2: SOAP's power-iteration product L Q_old with L = G G^T of rank
        // n/2 (a tall gradient's factor): its other columns are L's rounding noise.
        std::vector<Dense> inputs;
        inputs.push_back(random_matrix(n, n, gen));
        Dense scaled = random_matrix(n, n, gen);
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < n; ++i) scaled(i, j) *= std::pow(10.0, -8.0 * j / std::max(1, n - 1));
        inputs.push_back(scaled);
        const Dense g = random_matrix(n, std::max(1, n / 2), gen);
        inputs.push_back(matmul(matmul(g, g, false, true), householder_q(random_matrix(n, n, gen))));
        std::vector<float> host;
        for (Dense& a : inputs) {
            const std::vector<float> f = to_floats(a);
            a = from_floats(f, 0, n, n);  // both sides take the same fp32-rounded input
            host.insert(host.end(), f.begin(), f.end());
        }
        const int batch = int(inputs.size());
        auto d_a = uploaded(host), q = poisoned<float>(host.size()), scratch = poisoned<float>(host.size());
        const CholeskyQrReport report = cholesky_q_batched_gpu(q.data(), d_a.data(), n, batch, scratch.data());
        CHECK(report.householder_fallbacks == 0);  // none needed
        CHECK(report.passes <= 3 * batch);
        MESSAGE("n " << n << ": " << report.passes << " Cholesky passes for the " << batch << " matrices");
        const std::vector<float> gq = q.download();
        for (int b = 0; b < batch; ++b) {
            CAPTURE(b);
            const Dense gpu_q = from_floats(gq, size_t(b) * n * n, n, n);
            const QrDefects d = qr_defects(gpu_q, inputs[size_t(b)]);
            CHECK(d.orthogonality < 1e-6);
            CHECK(d.triangularity < 1e-5);
            // Matrix 2's columns past the rank follow rounding noise; its leading half is determined.
            const int determined = b == 2 ? std::max(1, n / 2) : n;
            const double difference = max_difference_up_to_column_signs(gpu_q, householder_q(inputs[size_t(b)]), determined);
            MESSAGE("n " << n << ", matrix " << b << ": largest difference from the CPU's Householder Q " << difference);
            CHECK(difference < 1e-5);
        }
        // A zero column makes the Gram matrix singular: Householder completes that basis, the
        // batch's other matrices keep theirs (also when the batch goes in chunks).
        Dense with_zero = random_matrix(n, n, gen);
        for (int i = 0; i < n; ++i) with_zero(i, n / 2) = 0;
        std::vector<float> mixed = to_floats(inputs[0]);
        const std::vector<float> zero_column = to_floats(with_zero);
        mixed.insert(mixed.end(), zero_column.begin(), zero_column.end());
        mixed.insert(mixed.end(), host.begin() + long(size_t(n) * n), host.begin() + long(2 * size_t(n) * n));
        // Scratch for one matrix at a time: three chunks, the fallback in the middle one.
        const size_t one_matrix = 2 * size_t(n) * n * sizeof(double);
        auto d_mixed = uploaded(mixed), q_mixed = poisoned<float>(mixed.size());
        auto mixed_scratch = poisoned<float>(mixed.size());
        CHECK(cholesky_q_batched_gpu(q_mixed.data(), d_mixed.data(), n, 3, mixed_scratch.data(), one_matrix)
                  .householder_fallbacks == 1);
        const std::vector<float> gq_mixed = q_mixed.download();
        CHECK(max_difference_up_to_column_signs(from_floats(gq_mixed, 0, n, n), householder_q(inputs[0]), n) < 1e-5);
        CHECK(max_difference_up_to_column_signs(from_floats(gq_mixed, 2 * size_t(n) * n, n, n), householder_q(inputs[1]),
                                                n) < 1e-5);
        const QrDefects d = qr_defects(from_floats(gq_mixed, size_t(n) * n, n, n), with_zero);
        CHECK(d.orthogonality < 1e-4);  // fp32 Householder
        CHECK(d.triangularity < 1e-4);
    }
}

TEST_CASE("GPU Cholesky QR takes only the passes a matrix needs: none for orthonormal columns, one near them") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (int n : {1, 7, 64, 200}) {
        CAPTURE(n);
        // A permutation matrix (exactly orthonormal columns): no pass, Q is the input.
        Dense permutation(n, n);
        std::vector<int> rows(static_cast<size_t>(n));
        std::iota(rows.begin(), rows.end(), 0);
        std::shuffle(rows.begin(), rows.end(), gen);
        for (int j = 0; j < n; ++j) permutation(rows[size_t(j)], j) = 1;
        const std::vector<float> exact = to_floats(permutation);
        auto d_exact = uploaded(exact), q = poisoned<float>(exact.size()), scratch = poisoned<float>(exact.size());
        const CholeskyQrReport none = cholesky_q_batched_gpu(q.data(), d_exact.data(), n, 1, scratch.data());
        CHECK(none.passes == 0);
        CHECK(none.grams == 1);
        CHECK(q.download() == exact);
        // An orthogonal matrix with noise: relative 1e-4, as SOAP's power-iteration products are
        // near the last basis, takes one plain pass; larger noise one plain pass while the unit
        // columns' ||X^T X - I||_F stays below 1 - 2^-10 (computed here in float64), else the
        // shifted pass first.
        const Dense orthogonal = householder_q(random_matrix(n, n, gen));
        const Dense noise = random_matrix(n, n, gen);
        for (double noise_size : {1e-4, 0.3, 1.0, 3.0}) {
            CAPTURE(noise_size);
            Dense near = orthogonal;
            for (int i = 0; i < n; ++i)
                for (int j = 0; j < n; ++j) near(i, j) += noise_size * noise(i, j) / std::sqrt(double(n));
            const std::vector<float> near_floats = to_floats(near);
            near = from_floats(near_floats, 0, n, n);
            Dense unit = near;
            for (int j = 0; j < n; ++j) {
                double length = 0;
                for (int i = 0; i < n; ++i) length += unit(i, j) * unit(i, j);
                for (int i = 0; i < n; ++i) unit(i, j) /= std::sqrt(length);
            }
            const Dense gram = matmul(unit, unit, true, false);
            double sum_squares = 0;
            for (int i = 0; i < n; ++i)
                for (int j = 0; j < n; ++j) sum_squares += std::pow(gram(i, j) - (i == j ? 1.0 : 0.0), 2);
            const double deviation = std::sqrt(sum_squares);
            auto d_near = uploaded(near_floats);
            const CholeskyQrReport few = cholesky_q_batched_gpu(q.data(), d_near.data(), n, 1, scratch.data());
            MESSAGE("n " << n << ", noise " << noise_size << ": ||X^T X - I||_F " << deviation << ", " << few.passes
                         << " passes, " << few.grams << " Gram matrices");
            if (n == 1) {
                CHECK(few.passes == 0);  // a single column is unit length already
                CHECK(few.grams == 1);
            } else if (deviation < 0.99) {
                CHECK(few.passes == 1);
                // From within 1/2 of the identity that pass is known to be the last; else one
                // more Gram matrix confirms it (near 1/2 the GPU's rounding of it decides).
                if (deviation <= 0.49) CHECK(few.grams == 1);
                if (deviation >= 0.51) CHECK(few.grams == 2);
            } else {  // shifted first; for small n the shift is below the tolerance, and one pass can do
                CHECK(few.passes <= 3);
                CHECK(few.grams <= few.passes + 1);
            }
            const Dense gpu_q = from_floats(q.download(), 0, n, n);
            CHECK(qr_defects(gpu_q, near).orthogonality < 1e-6);
            CHECK(max_difference_up_to_column_signs(gpu_q, householder_q(near), n) < 1e-5);
        }
    }
}

TEST_CASE("GPU training with every method: the loss falls, nothing diverges") {
    REQUIRE_GPU();
    TempDir dir;
    for (const char* name : {"muon", "scion", "shampoo", "soap", "psgd"}) {
        CAPTURE(name);
        const TrainOptions o = tiny_optimizer_run(dir, name, "cuda");
        std::ostringstream log;
        const TrainResult r = run_training(o, log);
        CAPTURE(log.str());
        CHECK(r.skipped_steps == 0);
        CHECK(r.val_loss_end < r.val_loss_start - 0.3);
    }
}

TEST_CASE("GPU Shampoo and SOAP reserve their refreshes' linear-algebra workspaces when built") {
    REQUIRE_GPU();
    // The workspaces are kept and shared by the process's calls, so each optimizer gets factors
    // wider than any other test's eigendecompositions and QRs (SOAP 1024, then Shampoo 1280; the
    // others stay at or below 256), which makes its reservation grow them;
    // then the steps through a refresh (for SOAP also its first call's eigendecompositions) must
    // allocate nothing more: all of it was there for the memory check that runs before training.
    std::mt19937_64 gen(fresh_seed());
    for (const auto& [name, width] : {std::pair<std::string, int>{"soap", 1024}, std::pair<std::string, int>{"shampoo", 1280}}) {
        CAPTURE(name);
        ParamLayout layout;
        layout.append("square", {width, width}, ParamKind::Matrix);
        layout.append("square2", {width, width}, ParamKind::Matrix);
        layout.append("tall", {width, width / 4}, ParamKind::Matrix);
        OptimizerConfig c;
        c.kind = parse_optimizer(name);
        c.shampoo.precondition_frequency = 2;
        c.soap.precondition_frequency = 2;
        const size_t before = linalg_workspace_bytes();
        GpuOptimizer gpu(layout, c);
        const size_t reserved = linalg_workspace_bytes();
        CHECK(reserved > before);
        auto d_params = uploaded(random_vector<float>(layout.total, gen));
        for (int step = 0; step < 5; ++step) {
            auto d_grads = uploaded(random_vector<float>(layout.total, gen));
            gpu.step(d_params.data(), d_grads.data(), 1e-3, 1.0, nullptr);
        }
        CHECK(linalg_workspace_bytes() == reserved);
    }
}

TEST_CASE("GPU SOAP refuses merged dimensions by name (the CPU runs them)") {
    REQUIRE_GPU();
    ParamLayout layout;
    layout.append("tall", {96, 48}, ParamKind::Matrix);
    OptimizerConfig c;
    c.kind = OptimizerKind::Soap;
    c.soap.max_precond_dim = 5000;
    c.soap.merge_dims = true;  // 96 x 48 = 4608 values: one dimension
    CHECK_THROWS_WITH_AS(GpuOptimizer(layout, c), doctest::Contains("would be merged into one dimension"), Error);
    c.soap.max_precond_dim = 4000;  // nothing merges: the GPU runs it
    GpuOptimizer runs(layout, c);
    c.soap.max_precond_dim = 64;  // one-sided: runs too (compared with the CPU above)
    GpuOptimizer one_sided(layout, c);
}

TEST_CASE("Blocked triangular products: their share of a dense product's multiply-adds") {
    // Side products: sum over row blocks of rows x (n - r0), over n^2; square: the blocks on and
    // above the diagonal, each rows x cols x (c1 - r0), over n^3. Worked by hand for 1024 in
    // blocks of 512: (512 * 1024 + 512 * 512) / 1024^2 and (512^3 + 512^2 * 1024 + 512^3) / 1024^3.
    CHECK(upper_triangular_product_fraction(1024, 512) == doctest::Approx(0.75));
    CHECK(upper_triangular_square_product_fraction(1024, 512) == doctest::Approx(0.5));
    CHECK(upper_triangular_product_fraction(3072, 512) == doctest::Approx(512.0 * 10752 / (3072.0 * 3072)));
    CHECK(upper_triangular_product_fraction(300, 512) == 1.0);  // one block: the dense product
    CHECK(upper_triangular_square_product_fraction(300, 512) == 1.0);
    // The default block: 256 below 2048, 512 from there.
    CHECK(upper_triangular_product_fraction(768) == doctest::Approx(upper_triangular_product_fraction(768, 256)));
    CHECK(upper_triangular_product_fraction(3072) == doctest::Approx(upper_triangular_product_fraction(3072, 512)));
    // Fine blocks approach the triangles' shares, 1/2 and 1/6.
    CHECK(upper_triangular_product_fraction(4096, 1) == doctest::Approx(0.5).epsilon(1e-3));
    CHECK(upper_triangular_square_product_fraction(4096, 8) == doctest::Approx(1.0 / 6).epsilon(1e-2));
}

TEST_CASE("PSGD on the GPU forms Q^T Q only where it pays before the factors change") {
    // Worked for gpt2-124m's 3072 x 768 matrices (3072 in blocks of 512: share 0.583; 768 in
    // blocks of 256: 0.667), in multiply-adds: chained 2 (3072^2 768 0.583) + 2 (768^2 3072 0.667)
    // = 1.088e10, with P 3072^2 768 + 3072 768^2 = 9.06e9, forming 3072^3 0.583 + 768^3 0.667
    // = 1.721e10: it pays from 1.721e10 / 1.82e9 = 9.5 steps on.
    CHECK_FALSE(psgd_products_pay_off(3072, 768, 1.0));  // update probability 1: chained
    CHECK_FALSE(psgd_products_pay_off(3072, 768, 9.0));
    CHECK(psgd_products_pay_off(3072, 768, 10.0));
    CHECK(psgd_products_pay_off(3072, 768, 1 / 0.03));  // at the schedule's floor: kept
    CHECK(psgd_products_pay_off(768, 3072, 10.0) == psgd_products_pay_off(3072, 768, 10.0));  // symmetric in m, n
    // Square 768 (both blocked, share 2/3): chained 4 (2/3) n^3, with P 2 n^3, forming (4/3) n^3:
    // pays after 2 steps. Square 100 (dense GEMMs): chained 4 n^3, with P 2 n^3, forming 2 n^3:
    // pays after 1 step, not at it.
    CHECK_FALSE(psgd_products_pay_off(768, 768, 2.0));
    CHECK(psgd_products_pay_off(768, 768, 2.1));
    CHECK_FALSE(psgd_products_pay_off(100, 100, 1.0));
    CHECK(psgd_products_pay_off(100, 100, 1.1));
    // A diagonal factor drops out. 1024 x 40 with the left diagonal: chained 2 40^2 1024, with P
    // 40^2 1024, forming 40^3: pays at once. 600 x 1000 with the right diagonal (600 in blocks of
    // 256: share (256 600 + 256 344 + 88 88) / 600^2 = 0.6928): chained 2 (0.6928) 600^2 1000 =
    // 4.988e8, with P 3.6e8, forming 0.6928 600^3 = 1.496e8: pays from 1.08 steps on. Both
    // diagonal: nothing to form.
    CHECK(psgd_products_pay_off(1024, 40, 1.0, true, false));
    CHECK_FALSE(psgd_products_pay_off(1024, 40, 1.0, false, true));  // the 1024-wide left one: 0.625 n^3 to form
    CHECK_FALSE(psgd_products_pay_off(600, 1000, 1.0, false, true));
    CHECK(psgd_products_pay_off(600, 1000, 1.1, false, true));
    CHECK_FALSE(psgd_products_pay_off(3072, 768, 1e6, true, true));
}

TEST_CASE("GPU PSGD with diagonal factors (the memory-saving rules) matches the CPU reference") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    // gpt2-tiny's 64 x 64, 192 x 64, 256 x 64 and 64 x 256 matrices under each rule that makes a
    // factor diagonal: one_diag (the larger side; of a square matrix the right), all_diag,
    // smart_one_diag (rectangular only), and --psgd-max-size-triangular 100 (the 192- and
    // 256-wide sides). Then a CPU state with diagonal factors resumed on the GPU, balancing and
    // the gradient in the update at probability 0.5, and one_diag on wide matrices: 1024 x 40
    // (a diagonal left factor; the right 40 x 40 forms Q^T Q, as psgd_products_pay_off says even
    // at probability 1) and 600 x 1000 (the right diagonal; the left 600-wide factor by blocks,
    // chained).
    struct Case {
        std::string label;
        std::function<void(PsgdConfig&)> setup;
        std::vector<std::pair<int, int>> shapes;  // empty: gpt2-tiny's layout
        int warm_steps, steps;
    };
    const auto mode = [](const char* name) { return [name](PsgdConfig& c) { c.memory_save_mode = name; }; };
    const std::vector<Case> cases = {
        {"one_diag", mode("one_diag"), {}, 0, 4},
        {"all_diag", mode("all_diag"), {}, 0, 4},
        {"smart_one_diag", mode("smart_one_diag"), {}, 0, 4},
        {"max_size_triangular 100", [](PsgdConfig& c) { c.max_size_triangular = 100; }, {}, 0, 4},
        {"one_diag resumed from the CPU, balanced, gradient into the update, probability 0.5",
         [](PsgdConfig& c) {
             c.memory_save_mode = "one_diag";
             c.balance_probability = 1.0;
             c.momentum_into_precond_update = false;
             c.update_prob_max = 0.5;
         },
         {}, 3, 5},
        {"one_diag, wide matrices", mode("one_diag"), {{1024, 40}, {600, 1000}}, 0, 3},
    };
    for (const Case& k : cases) {
        CAPTURE(k.label);
        const ParamLayout layout = k.shapes.empty() ? ParamLayout::build(small_model("gpt2-tiny")) : matrices_layout(k.shapes);
        OptimizerConfig c;
        c.kind = OptimizerKind::Psgd;
        k.setup(c.psgd);
        const SideBySide r = run_side_by_side(layout, c, k.warm_steps, k.steps, seed);
        const double error = relative_error(r.gpu_change, r.cpu_change);
        MESSAGE("psgd " << k.label << ": relative difference of the weight changes " << error);
        CHECK(error < 2e-3);
        // The state's shapes (checked there) say which factors are diagonal: at least one is.
        check_states_agree(r, {"momentum", "q_left", "q_right"});
        CHECK(std::any_of(r.gpu_state.tensors.begin(), r.gpu_state.tensors.end(),
                          [](const StateTensor& t) { return t.name.find(".q_") != std::string::npos && t.shape.size() == 1; }));
    }
}

TEST_CASE("GPU PSGD's per-matrix kernels: reductions, norm lower bound and diagonal factors match plain loops") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    // Reductions split each matrix over up to 128 blocks (fewer for many matrices), then add the
    // blocks' partial results in order: one element, sizes around a block's share, a matrix that
    // takes all 128 blocks, and 2000 matrices (3 blocks each).
    for (const auto& [count, n] : {std::pair{3, int64_t(1)}, std::pair{2, int64_t(2049)},
                                   std::pair{2, int64_t(128) * 2048 + 77}, std::pair{2000, int64_t(5000)}}) {
        CAPTURE(count);
        CAPTURE(n);
        const std::vector<float> x = random_vector<float>(size_t(count) * size_t(n), gen);
        auto d_x = uploaded(x);
        auto sum_sq = poisoned<float>(size_t(count)), mean_abs = poisoned<float>(size_t(count)),
             max_abs = poisoned<float>(size_t(count));
        sum_squares_gpu(sum_sq.data(), d_x.data(), count, n);
        mean_abs_gpu(mean_abs.data(), d_x.data(), count, n);
        max_abs_gpu(max_abs.data(), d_x.data(), count, n);
        std::vector<double> want_sq(size_t(count), 0.0), want_mean(size_t(count), 0.0), want_max(size_t(count), 0.0);
        for (int t = 0; t < count; ++t)
            for (int64_t i = 0; i < n; ++i) {
                const double v = x[size_t(t * n + i)];
                want_sq[size_t(t)] += v * v;
                want_mean[size_t(t)] += std::abs(v) / double(n);
                want_max[size_t(t)] = std::max(want_max[size_t(t)], std::abs(v));
            }
        CHECK(relative_error(sum_sq.download(), want_sq) < 1e-6);
        CHECK(relative_error(mean_abs.download(), want_mean) < 1e-6);
        CHECK(relative_error(max_abs.download(), want_max) == 0.0);
    }
    // A NaN anywhere in a matrix makes its max |x| NaN, whichever block and thread meet it
    // first (first, middle and last element of a matrix spread over many blocks).
    {
        const int count = 3;
        const int64_t n = int64_t(64) * 2048 + 5;
        std::vector<float> x = random_vector<float>(size_t(count) * size_t(n), gen);
        const int64_t nan_at[count] = {0, n / 2, n - 1};
        for (int t = 0; t < count; ++t) x[size_t(t * n + nan_at[t])] = NAN;
        auto d_x = uploaded(x);
        auto max_abs = uploaded(std::vector<float>(size_t(count), 0.0f));  // not NaN before: the kernel must write it
        max_abs_gpu(max_abs.data(), d_x.data(), count, n);
        for (float m : max_abs.download()) CHECK(std::isnan(m));
    }
    // The spectral-norm lower bound of t1 + t2 (symmetric), against the CPU's, over row slices
    // that are empty (n = 1, 17) or uneven (300).
    for (int n : {1, 17, 300}) {
        CAPTURE(n);
        const int count = 3;
        std::vector<float> t1, t2;
        std::vector<double> want;
        for (int t = 0; t < count; ++t) {
            const Dense a = random_matrix(n, n + 3, gen), b = random_matrix(n, 2, gen);
            const Dense g1 = matmul(a, a, false, true), g2 = matmul(b, b, false, true);
            const std::vector<float> f1 = to_floats(g1), f2 = to_floats(g2);
            t1.insert(t1.end(), f1.begin(), f1.end());
            t2.insert(t2.end(), f2.begin(), f2.end());
            Dense sum = dense_from(f1.data(), n, n);
            for (size_t i = 0; i < sum.values.size(); ++i) sum.values[i] += f2[i];
            want.push_back(psgd_norm_lower_bound(sum));
        }
        auto d_t1 = uploaded(t1), d_t2 = uploaded(t2);
        auto work = poisoned<float>(psgd_norm_lower_bound_work(n, count)), bound = poisoned<float>(size_t(count));
        psgd_norm_lower_bound_gpu(bound.data(), d_t1.data(), d_t2.data(), work.data(), n, count);
        CHECK(relative_error(bound.download(), want) < 1e-5);
    }
    // Diagonal factors on 3 matrices of 37 x 70: rows and columns scaled by q^power, the rows' and
    // columns' sums of squares, and the element-wise factor update.
    const int count = 3, rows = 37, cols = 70;
    const std::vector<float> x = random_vector<float>(size_t(count) * rows * cols, gen);
    std::vector<float> q_left = random_vector<float>(size_t(count) * rows, gen),
                       q_right = random_vector<float>(size_t(count) * cols, gen);
    for (float& v : q_left) v = 0.5f + std::abs(v);
    for (float& v : q_right) v = 0.5f + std::abs(v);
    auto d_x = uploaded(x), d_left = uploaded(q_left), d_right = uploaded(q_right);
    const auto at = [&](int t, int r, int c) { return size_t(t) * rows * cols + size_t(r) * cols + size_t(c); };
    for (int power : {1, -1, 2})
        for (const auto& [left, right] : {std::pair{true, true}, std::pair{true, false}, std::pair{false, true}}) {
            CAPTURE(power);
            CAPTURE(left);
            CAPTURE(right);
            auto out = poisoned<float>(x.size());
            psgd_scale_rows_columns_gpu(out.data(), d_x.data(), left ? d_left.data() : nullptr,
                                        right ? d_right.data() : nullptr, power, rows, cols, count);
            std::vector<double> want(x.size());
            for (int t = 0; t < count; ++t)
                for (int r = 0; r < rows; ++r)
                    for (int c = 0; c < cols; ++c) {
                        const double scale = (left ? q_left[size_t(t * rows + r)] : 1.0) *
                                             (right ? q_right[size_t(t * cols + c)] : 1.0);
                        want[at(t, r, c)] = x[at(t, r, c)] * std::pow(scale, power);
                    }
            CHECK(relative_error(out.download(), want) < 1e-6);
        }
    const std::vector<float> y = random_vector<float>(x.size(), gen);
    auto d_y = uploaded(y);
    for (bool columns : {false, true}) {
        CAPTURE(columns);
        const int n = columns ? cols : rows;
        std::vector<double> want_x(size_t(count) * n), want_y(size_t(count) * n);
        for (int t = 0; t < count; ++t)
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < cols; ++c) {
                    const size_t k = size_t(t) * n + size_t(columns ? c : r);
                    want_x[k] += double(x[at(t, r, c)]) * x[at(t, r, c)];
                    want_y[k] += double(y[at(t, r, c)]) * y[at(t, r, c)];
                }
        auto t1 = poisoned<float>(want_x.size()), t2 = poisoned<float>(want_x.size());
        sums_of_squares_gpu(t1.data(), d_x.data(), rows, cols, count, columns);
        sums_of_squares_gpu(t2.data(), d_y.data(), rows, cols, count, columns);
        CHECK(relative_error(t1.download(), want_x) < 1e-6);
        CHECK(relative_error(t2.download(), want_y) < 1e-6);
        // q - lr (t1 - t2) q / max|t1 + t2|, per matrix.
        const std::vector<float>& q = columns ? q_right : q_left;
        const std::vector<float> g1 = t1.download(), g2 = t2.download();
        std::vector<double> want_q(q.size());
        for (int t = 0; t < count; ++t) {
            double norm = 0;
            for (int i = 0; i < n; ++i) norm = std::max(norm, std::abs(double(g1[size_t(t * n + i)]) + g2[size_t(t * n + i)]));
            for (int i = 0; i < n; ++i) {
                const size_t k = size_t(t * n + i);
                want_q[k] = q[k] - 0.1 * (double(g1[k]) - g2[k]) * q[k] / norm;
            }
        }
        auto candidate = poisoned<float>(q.size());
        psgd_diagonal_factor_update_gpu(candidate.data(), columns ? d_right.data() : d_left.data(), t1.data(), t2.data(),
                                        n, count, 0.1f);
        CHECK(relative_error(candidate.download(), want_q) < 1e-6);
    }
}

TEST_CASE("GPU per-matrix sort orders equal the CPU's stable orders_per_matrix (SOAP's and Shampoo's QR-path sorts)") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    // Values drawn from a few levels, so that most have equal twins whose order must stay the
    // index order, with NaN, both infinities and both zeros among them. Sizes: one value, odd
    // sizes padded to a power of two, SOAP's 768 and 3072, a size that needs over 48 KiB of
    // shared memory, the largest the GPU sorts, and one beyond it (sorted on the host).
    std::uniform_int_distribution<int> level(0, 9);
    const float specials[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f};
    for (int n : {1, 2, 7, 768, 3072, 10000, kDeviceSortMax, kDeviceSortMax + 1}) {
        CAPTURE(n);
        const int count = 3;
        std::vector<float> values(size_t(n) * count);
        for (float& v : values) {
            const int l = level(gen);
            v = l < 5 ? specials[l] : float(l) * 0.25f - 1.5f;
        }
        auto d_values = uploaded(values);
        for (bool descending : {false, true}) {
            CAPTURE(descending);
            auto d_order = poisoned<int>(values.size());
            orders_per_matrix_gpu(d_order.data(), d_values.data(), n, count, descending);
            CHECK(d_order.download() == orders_per_matrix(values, n, descending));
        }
    }
}

TEST_CASE("GPU matrix products count their FLOPs as they are issued (bench's optimizer FLOPs)") {
    REQUIRE_GPU();
    // Each call adds its own count: 2 m n k per GEMM, n (n + 1) k per syrk Gram matrix, n^2 cols
    // per triangular solve, and the blocked triangular products their blocks' GEMMs.
    const int m = 48, n = 40, k = 24, batch = 3;
    auto a = uploaded(std::vector<float>(size_t(m) * k * batch, 0.5f));
    auto b = uploaded(std::vector<float>(size_t(k) * n * batch, 0.25f));
    auto d = poisoned<float>(size_t(m) * n * batch);
    double before = issued_matrix_flops();
    batched_matmul_f32_gpu(d.data(), d.data(), a.data(), false, b.data(), false, m, n, k, 1.0f, 0.0f, batch,
                           int64_t(m) * k, int64_t(k) * n, int64_t(m) * n);
    CHECK(issued_matrix_flops() - before == 2.0 * m * n * k * batch);
    auto gram = poisoned<float>(size_t(m) * m * batch);
    before = issued_matrix_flops();
    symmetric_gram_batched_gpu(gram.data(), a.data(), false, m, k, batch, 1.0f, 0.0f);
    CHECK(issued_matrix_flops() - before == double(m) * (m + 1) * k * batch);
    std::vector<float> u_host(size_t(n) * n * batch, 0.0f);
    for (int t = 0; t < batch; ++t)
        for (int i = 0; i < n; ++i) u_host[size_t(t) * n * n + size_t(i) * n + i] = 2.0f;
    auto u = uploaded(u_host);
    auto x = uploaded(std::vector<float>(size_t(m) * n * batch, 1.0f));
    before = issued_matrix_flops();
    solve_upper_right_batched_gpu(x.data(), u.data(), m, n, batch);
    CHECK(issued_matrix_flops() - before == double(n) * n * m * batch);
    // A product with a 40 x 40 triangle by blocks of 16 (3 row blocks: k = 40, 24, 8 for 16,
    // 16, 8 rows) times a 40 x 48 matrix.
    auto y = uploaded(std::vector<float>(size_t(n) * m * batch, 1.0f));
    auto out = poisoned<float>(size_t(n) * m * batch);
    before = issued_matrix_flops();
    upper_triangular_product_batched_gpu(out.data(), u.data(), false, y.data(), n, m, batch, false, 16);
    CHECK(issued_matrix_flops() - before == 2.0 * m * batch * (16.0 * 40 + 16.0 * 24 + 8.0 * 8));
    CHECK(2.0 * m * batch * (16.0 * 40 + 16.0 * 24 + 8.0 * 8) ==
          doctest::Approx(2.0 * n * n * m * batch * upper_triangular_product_fraction(n, 16)));
}
