// Preconditioner failures (issue: a long run survives numerical faults): a Shampoo root, SOAP
// basis or PSGD factor that comes out non-finite is not used; the last good one stays (the
// identity when there was none yet) and the failure is counted, on the CPU references and on
// the GPU alike. Faults are provoked the way they happen in training: gradients large enough
// (1e25) that the fp32 factor statistics overflow, or an infinite gradient entry for PSGD,
// whose factor update is scale-free.
#include <algorithm>
#include <cmath>
#include <functional>
#include <random>

#include "gpu_helpers.hpp"
#include "optim/gpu_optimizer.hpp"
#include "optim/optimizer.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

// The state tensors whose names end in one of `suffixes` (the preconditioner matrices).
std::vector<const StateTensor*> pick(const OptimizerState& state, const std::vector<std::string>& suffixes) {
    std::vector<const StateTensor*> out;
    for (const auto& t : state.tensors)
        for (const auto& s : suffixes)
            if (t.name.size() > s.size() && t.name.compare(t.name.size() - s.size(), s.size(), s) == 0 &&
                t.name[t.name.size() - s.size() - 1] == '.')
                out.push_back(&t);
    return out;
}

bool is_identity(const StateTensor& t) {
    const int64_t n = t.shape.at(0);
    for (int64_t i = 0; i < n * n; ++i)
        if (t.values[size_t(i)] != (i / n == i % n ? 1.0f : 0.0f)) return false;
    return true;
}

struct FaultCase {
    const char* optimizer;
    std::function<void(OptimizerConfig&)> setup;
    std::vector<std::string> preconditioners;  // state suffixes that must be kept on a fault
    long good_steps;                            // normal steps before the faulty one (a refresh step)
    bool infinite_entry;                        // the fault: one +inf entry (else every gradient x 1e25)
};

const std::vector<FaultCase>& fault_cases() {
    static const std::vector<FaultCase> cases = {
        {"shampoo", [](OptimizerConfig& c) { c.shampoo.precondition_frequency = 2; }, {"left_root", "right_root"}, 5,
         false},
        {"soap", [](OptimizerConfig& c) { c.soap.precondition_frequency = 2; }, {"left_basis", "right_basis"}, 6, false},
        {"psgd", [](OptimizerConfig& c) { c.psgd.balance_probability = 0; }, {"q_left", "q_right"}, 3, true},
    };
    return cases;
}

// Gradients for step `step` (fresh normal values; the faulty step's as the case says: +inf
// at the first entry of every hidden matrix, or every entry x 1e25).
std::vector<float> gradients(const ParamLayout& layout, uint64_t seed, long step, bool faulty, const FaultCase& k) {
    std::mt19937_64 gen(seed * 1000 + uint64_t(step));
    std::normal_distribution<float> normal(0.0f, 0.02f);
    std::vector<float> g(layout.total);
    for (float& x : g) x = normal(gen);
    if (faulty && k.infinite_entry) {
        OptimizerConfig c;
        c.kind = parse_optimizer(k.optimizer);
        for (const MatrixSlot& m : route_parameters(layout, c).matrices) g[m.offset] = INFINITY;
    } else if (faulty) {
        for (float& x : g) x *= 1e25f;
    }
    return g;
}

// Runs good_steps normal steps and one faulty step through `step`; returns the state before
// and after the fault, and the failures counted.
struct FaultRun {
    OptimizerState before, after;
    long rejected = 0;
};

template <typename Step, typename State, typename Rejected>
FaultRun run_fault(const FaultCase& k, const ParamLayout& layout, uint64_t seed, Step step, State state,
                   Rejected rejected) {
    FaultRun r;
    for (long s = 1; s <= k.good_steps; ++s) step(gradients(layout, seed, s, false, k));
    r.before = state();
    CHECK(rejected() == 0);
    step(gradients(layout, seed, k.good_steps + 1, true, k));
    r.after = state();
    r.rejected = rejected();
    return r;
}

void check_kept(const FaultCase& k, const FaultRun& r) {
    const auto before = pick(r.before, k.preconditioners), after = pick(r.after, k.preconditioners);
    REQUIRE(before.size() == after.size());
    REQUIRE(!before.empty());
    CHECK(r.rejected == long(after.size()));  // every matrix's refresh failed, each counted once
    for (size_t i = 0; i < before.size(); ++i) {
        CAPTURE(after[i]->name);
        CHECK(after[i]->values == before[i]->values);  // the last good one, bit for bit
    }
}

}  // namespace

TEST_CASE("a non-finite preconditioner is not used: the last good one stays and is counted (CPU references)") {
    const ParamLayout layout = ParamLayout::build(small_vocab_config("gpt2-tiny"));
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    for (const FaultCase& k : fault_cases()) {
        CAPTURE(k.optimizer);
        OptimizerConfig c;
        c.kind = parse_optimizer(k.optimizer);
        k.setup(c);
        std::vector<float> params(layout.total, 0.01f);
        auto optimizer = make_cpu_optimizer(layout, c);
        const FaultRun r = run_fault(
            k, layout, seed, [&](std::vector<float> g) { optimizer->step(params.data(), g.data(), 1e-3, 1.0); },
            [&] { return optimizer->state(); }, [&] { return optimizer->rejected_preconditioners(); });
        check_kept(k, r);
        if (!k.infinite_entry)  // an overflowing factor must not reach the weights
            CHECK(std::all_of(params.begin(), params.end(), [](float p) { return std::isfinite(p); }));
    }
    // A fault before any good basis or root: the identity stands in (SOAP's first call).
    OptimizerConfig c;
    c.kind = OptimizerKind::Soap;
    auto soap = make_cpu_optimizer(layout, c);
    std::vector<float> params(layout.total, 0.01f);
    std::vector<float> huge = gradients(layout, seed, 1, true, fault_cases()[1]);
    soap->step(params.data(), huge.data(), 1e-3, 1.0);
    const OptimizerState state = soap->state();
    const auto bases = pick(state, {"left_basis", "right_basis"});
    CHECK(soap->rejected_preconditioners() == long(bases.size()));
    for (const StateTensor* t : bases) CHECK(is_identity(*t));
}

TEST_CASE("GPU: a non-finite preconditioner is not used: the last good one stays and is counted, as on the CPU") {
    REQUIRE_GPU();
    const ParamLayout layout = ParamLayout::build(small_vocab_config("gpt2-tiny"));
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    for (const FaultCase& k : fault_cases()) {
        CAPTURE(k.optimizer);
        OptimizerConfig c;
        c.kind = parse_optimizer(k.optimizer);
        k.setup(c);
        GpuOptimizer optimizer(layout, c);
        DeviceBuffer<float> params = uploaded(std::vector<float>(layout.total, 0.01f));
        DeviceBuffer<float> grads(layout.total);
        const FaultRun r = run_fault(
            k, layout, seed,
            [&](std::vector<float> g) {
                grads.upload(g);
                optimizer.step(params.data(), grads.data(), 1e-3, 1.0, nullptr);
            },
            [&] { return optimizer.state(); }, [&] { return optimizer.rejected_preconditioners(); });
        check_kept(k, r);
        const std::vector<float> updated = params.download();
        if (!k.infinite_entry)
            CHECK(std::all_of(updated.begin(), updated.end(), [](float p) { return std::isfinite(p); }));
    }
    OptimizerConfig c;
    c.kind = OptimizerKind::Soap;
    GpuOptimizer soap(layout, c);
    DeviceBuffer<float> params = uploaded(std::vector<float>(layout.total, 0.01f));
    DeviceBuffer<float> grads = uploaded(gradients(layout, seed, 1, true, fault_cases()[1]));
    soap.step(params.data(), grads.data(), 1e-3, 1.0, nullptr);
    const OptimizerState state = soap.state();
    const auto bases = pick(state, {"left_basis", "right_basis"});
    CHECK(soap.rejected_preconditioners() == long(bases.size()));
    for (const StateTensor* t : bases) CHECK(is_identity(*t));
}
