// Preconditioner failures (issue: a long run survives numerical faults): a Shampoo root, SOAP
// basis or PSGD factor that comes out non-finite is not used; the last good one stays (the
// identity when there was none yet) and the failure is counted, on the CPU references and on
// the GPU alike. Faults are provoked the way they happen in training: gradients large enough
// (1e25) that the fp32 factor statistics overflow, or an infinite gradient entry for PSGD,
// whose factor update is scale-free.
#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
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

// One optimizer with its weights, on the CPU or the GPU, behind the calls the checks need.
struct CpuSide {
    std::vector<float> params;
    std::unique_ptr<Optimizer> optimizer;
    CpuSide(const ParamLayout& layout, const OptimizerConfig& c)
        : params(layout.total, 0.01f), optimizer(make_cpu_optimizer(layout, c)) {}
    void step(std::vector<float> grads) { optimizer->step(params.data(), grads.data(), 1e-3, 1.0); }
    OptimizerState state() const { return optimizer->state(); }
    long rejected() const { return optimizer->rejected_preconditioners(); }
    std::vector<float> weights() const { return params; }
};

struct GpuSide {
    GpuOptimizer optimizer;
    DeviceBuffer<float> params, grads;
    GpuSide(const ParamLayout& layout, const OptimizerConfig& c)
        : optimizer(layout, c), params(uploaded(std::vector<float>(layout.total, 0.01f))), grads(layout.total) {}
    void step(const std::vector<float>& host_grads) {
        grads.upload(host_grads);
        optimizer.step(params.data(), grads.data(), 1e-3, 1.0, nullptr);
    }
    OptimizerState state() const { return optimizer.state(); }
    long rejected() const { return optimizer.rejected_preconditioners(); }
    std::vector<float> weights() const { return params.download(); }
};

// Every fault case on one side: good_steps normal steps, then the faulty one; the
// preconditioners must be the ones from before the fault, bit for bit, each rejection counted
// once, and (overflowing factors) the weights finite. Then a fault before any good basis: the
// identity stands in (SOAP's first call).
template <typename Side>
void check_fault_cases() {
    const ParamLayout layout = ParamLayout::build(small_vocab_config("gpt2-tiny"));
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    for (const FaultCase& k : fault_cases()) {
        CAPTURE(k.optimizer);
        OptimizerConfig c;
        c.kind = parse_optimizer(k.optimizer);
        k.setup(c);
        Side side(layout, c);
        for (long s = 1; s <= k.good_steps; ++s) side.step(gradients(layout, seed, s, false, k));
        const OptimizerState before = side.state();
        CHECK(side.rejected() == 0);
        side.step(gradients(layout, seed, k.good_steps + 1, true, k));
        const OptimizerState after = side.state();
        const auto kept_before = pick(before, k.preconditioners), kept_after = pick(after, k.preconditioners);
        REQUIRE(kept_before.size() == kept_after.size());
        REQUIRE(!kept_before.empty());
        CHECK(side.rejected() == long(kept_after.size()));  // every matrix's refresh failed, each counted once
        for (size_t i = 0; i < kept_before.size(); ++i) {
            CAPTURE(kept_after[i]->name);
            CHECK(kept_after[i]->values == kept_before[i]->values);  // the last good one, bit for bit
        }
        const std::vector<float> weights = side.weights();
        if (!k.infinite_entry)  // an overflowing factor must not reach the weights
            CHECK(std::all_of(weights.begin(), weights.end(), [](float p) { return std::isfinite(p); }));
    }
    OptimizerConfig c;
    c.kind = OptimizerKind::Soap;
    Side soap(layout, c);
    soap.step(gradients(layout, seed, 1, true, fault_cases()[1]));
    const OptimizerState state = soap.state();
    const auto bases = pick(state, {"left_basis", "right_basis"});
    CHECK(soap.rejected() == long(bases.size()));
    for (const StateTensor* t : bases) CHECK(is_identity(*t));
}

}  // namespace

TEST_CASE("a non-finite preconditioner is not used: the last good one stays and is counted (CPU references)") {
    check_fault_cases<CpuSide>();
}

TEST_CASE("GPU: a non-finite preconditioner is not used: the last good one stays and is counted, as on the CPU") {
    REQUIRE_GPU();
    check_fault_cases<GpuSide>();
}
