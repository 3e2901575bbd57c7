// qopt against an independent implementation: tools/torch_oracle.py rebuilt both layouts in
// PyTorch (float64), loaded the weights init_model wrote, and recorded the loss, every
// parameter's gradient (norm and first values) and a 50-step AdamW loss curve in
// tests/fixtures/torch_oracle_<preset>.json. Here qopt recomputes them from the same initial
// weights (init_params with the recorded seed) and batches:
//   CPU reference, float64: loss and gradients to 1e-8 (both are exact math in float64);
//   CPU training backend (float32): the loss curve within 2e-3 relative per step;
//   GPU (bf16 compute, where present): loss 5e-3, gradient norms 5e-2, curve 3e-2 per step.
#include "core/files.hpp"
#include "core/json.hpp"
#include "gpu_helpers.hpp"
#include "model/cpu_model.hpp"
#include "model/gpu_model.hpp"
#include "train/backend.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

// The batches of tools/torch_oracle.py: input[i] = (7i + 3 step) % 97 + i % 5, target = (input + 1) % 97.
void oracle_batch(int step, int n, std::vector<int>& inputs, std::vector<int>& targets) {
    inputs.resize(size_t(n));
    targets.resize(size_t(n));
    for (int i = 0; i < n; ++i) {
        inputs[size_t(i)] = (7 * i + 3 * step) % 97 + i % 5;
        targets[size_t(i)] = (inputs[size_t(i)] + 1) % 97;
    }
}

struct Oracle {
    Json fixture;
    ModelConfig config;
    std::vector<float> initial;
    int batch = 0, seq_len = 0;
};

Oracle load_oracle(const std::string& preset) {
    const std::string path = "tests/fixtures/torch_oracle_" + preset + ".json";
    REQUIRE_MESSAGE(file_exists(path), path << " is missing (tools/make_oracle_fixtures.sh writes it)");
    Oracle o;
    o.fixture = Json::parse(read_file(path));
    o.config = ModelConfig::from_json(o.fixture.at("config"));
    const ParamLayout layout = ParamLayout::build(o.config);
    o.initial.resize(layout.total);
    init_params(layout, o.fixture.at("seed").as_uint(), o.initial.data());
    o.batch = int(o.fixture.at("batch").as_int());
    o.seq_len = int(o.fixture.at("seq_len").as_int());
    return o;
}

// Relative difference of gradient norms and first values, per tensor, against the fixture.
template <typename Grad>
void check_gradients(const Oracle& o, const ParamLayout& layout, const Grad& grads, double norm_bound,
                     double value_bound) {
    const Json& expected = o.fixture.at("gradients");
    for (const auto& t : layout.tensors) {
        CAPTURE(t.name);
        const Json& e = expected.at(t.name);
        double sum_sq = 0;
        for (size_t i = 0; i < t.numel; ++i) sum_sq += double(grads[t.offset + i]) * double(grads[t.offset + i]);
        const double want = e.at("norm").as_double();
        CHECK(std::abs(std::sqrt(sum_sq) - want) <= norm_bound * want + 1e-12);
        const Json& first = e.at("first");
        for (size_t i = 0; i < first.size(); ++i)
            CHECK(std::abs(double(grads[t.offset + i]) - first[i].as_double()) <= value_bound * want + 1e-12);
    }
}

// Runs the fixture's training recipe on a backend; returns the loss per step.
std::vector<double> train_curve(const Oracle& o, TrainBackend& backend) {
    const Json& recipe = o.fixture.at("training");
    const double lr = recipe.at("lr").as_double(), clip = recipe.at("grad_clip").as_double();
    backend.set_params(o.initial);
    std::vector<double> losses;
    std::vector<int> inputs, targets;
    for (int64_t step = 0; step < recipe.at("steps").as_int(); ++step) {
        oracle_batch(int(step), o.batch * o.seq_len, inputs, targets);
        backend.zero_grads();
        losses.push_back(backend.forward_backward(inputs.data(), targets.data(), o.batch, o.seq_len, 1.0));
        const double norm = backend.grad_norm();
        backend.step(lr, norm > clip ? clip / norm : 1.0);
    }
    return losses;
}

OptimizerConfig oracle_adamw(const Oracle& o) {
    const Json& recipe = o.fixture.at("training");
    OptimizerConfig c;
    c.adamw.beta1 = recipe.at("betas")[0].as_double();
    c.adamw.beta2 = recipe.at("betas")[1].as_double();
    c.adamw.eps = recipe.at("eps").as_double();
    c.adamw.weight_decay = recipe.at("weight_decay").as_double();
    return c;
}

void check_curve(const Oracle& o, const std::vector<double>& losses, double bound) {
    const Json& expected = o.fixture.at("training").at("losses");
    REQUIRE(losses.size() == expected.size());
    for (size_t s = 0; s < losses.size(); ++s) {
        CAPTURE(s);
        CHECK(losses[s] == doctest::Approx(expected[s].as_double()).epsilon(bound));
    }
    CHECK(expected[expected.size() - 1].as_double() < expected[0].as_double() - 1.0);  // a curve that moves
}

constexpr const char* kPresets[] = {"olmo2-tiny", "gpt2-tiny"};

}  // namespace

TEST_CASE("PyTorch oracle: CPU reference loss and every gradient equal the float64 PyTorch model") {
    for (const char* preset : kPresets) {
        CAPTURE(preset);
        const Oracle o = load_oracle(preset);
        CpuModel<double> model(o.config);
        model.params().assign(o.initial.begin(), o.initial.end());
        std::vector<int> inputs, targets;
        oracle_batch(0, o.batch * o.seq_len, inputs, targets);
        const double loss = model.forward_backward(inputs.data(), targets.data(), o.batch, o.seq_len, 1.0);
        CHECK(loss == doctest::Approx(o.fixture.at("loss").as_double()).epsilon(1e-10));
        check_gradients(o, model.layout(), model.grads(), 1e-8, 1e-8);
    }
}

TEST_CASE("PyTorch oracle: 50 AdamW steps on the CPU backend follow PyTorch's loss curve") {
    for (const char* preset : kPresets) {
        CAPTURE(preset);
        const Oracle o = load_oracle(preset);
        auto backend = make_cpu_backend(o.config, oracle_adamw(o));
        check_curve(o, train_curve(o, *backend), 2e-3);
    }
}

TEST_CASE("PyTorch oracle: the GPU path's loss, gradients and 50-step curve match PyTorch within bf16 noise") {
    REQUIRE_GPU();
    for (const char* preset : kPresets) {
        CAPTURE(preset);
        const Oracle o = load_oracle(preset);
        GpuModel model(o.config);
        model.upload_params(o.initial);
        std::vector<int> inputs, targets;
        oracle_batch(0, o.batch * o.seq_len, inputs, targets);
        const double loss = model.forward_backward(inputs.data(), targets.data(), o.batch, o.seq_len, 1.0f);
        CHECK(loss == doctest::Approx(o.fixture.at("loss").as_double()).epsilon(5e-3));
        const std::vector<float> grads = model.download_grads();
        check_gradients(o, model.layout(), grads, 5e-2, 1e-1);
        auto backend = make_cuda_backend(o.config, oracle_adamw(o));
        check_curve(o, train_curve(o, *backend), 3e-2);
    }
}
