// PTQ: GPTQ against its defining properties (identity Hessian = RTN; never worse than RTN on
// the layer-output error it minimises; U^T U = H^-1), packed codes round-trip, the quantized
// forward of QAT equals the PTQ evaluation of the same weights (same quantizer code), and the
// `ptq` binary end to end on a tiny trained checkpoint (results row, quantized checkpoint,
// clear errors on bad input); the GPU GPTQ against the CPU one (skips without a GPU).
#include <fstream>

#include "core/error.hpp"
#include "core/safetensors.hpp"
#include "gpu_helpers.hpp"
#include "model/cpu_model.hpp"
#include "quant/gptq.hpp"
#include "quant/hadamard.hpp"
#include "quant/packed_checkpoint.hpp"
#include "train/checkpoint.hpp"
#include "train_helpers.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

// X [n, cols] with correlated columns (a random mixing of fewer sources), H = X^T X.
std::vector<double> correlated_inputs(int n, int cols, std::mt19937_64& gen, std::vector<double>& x) {
    const int sources = cols / 2;
    const std::vector<double> s = random_vector<double>(size_t(n) * sources, gen);
    const std::vector<double> mix = random_vector<double>(size_t(sources) * cols, gen);
    x.assign(size_t(n) * cols, 0.0);
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < sources; ++k)
            for (int j = 0; j < cols; ++j) x[size_t(i) * cols + j] += s[size_t(i) * sources + k] * mix[size_t(k) * cols + j];
    std::vector<double> h(size_t(cols) * cols, 0.0);
    for (int i = 0; i < n; ++i)
        for (int a = 0; a < cols; ++a)
            for (int b = 0; b < cols; ++b) h[size_t(a) * cols + b] += x[size_t(i) * cols + a] * x[size_t(i) * cols + b];
    return h;
}

// ||X (W - Q)^T||^2
double output_error(const std::vector<double>& x, int n, const std::vector<float>& w, const std::vector<float>& q,
                    int rows, int cols) {
    double e = 0;
    for (int i = 0; i < n; ++i)
        for (int r = 0; r < rows; ++r) {
            double d = 0;
            for (int c = 0; c < cols; ++c) d += x[size_t(i) * cols + c] * double(w[size_t(r) * cols + c] - q[size_t(r) * cols + c]);
            e += d * d;
        }
    return e;
}

}  // namespace

TEST_CASE("GPTQ: U^T U = H^-1; identity Hessian gives RTN; lower output error than RTN") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int rows = 24, cols = 48, n = 200;
    std::vector<double> x;
    const std::vector<double> h = correlated_inputs(n, cols, gen, x);
    std::vector<double> damped = h;
    for (int i = 0; i < cols; ++i) damped[size_t(i) * cols + i] += 0.01 * h[size_t(i) * cols + i] + 1e-3;
    const std::vector<double> u = upper_cholesky_of_inverse(damped, cols);
    double worst = 0;  // (U^T U) H = I
    for (int i = 0; i < cols; ++i)
        for (int j = 0; j < cols; ++j) {
            double v = 0;
            for (int k = 0; k < cols; ++k) {
                double uu = 0;
                for (int m = 0; m <= std::min(i, k); ++m) uu += u[size_t(m) * cols + i] * u[size_t(m) * cols + k];
                v += uu * damped[size_t(k) * cols + j];
            }
            worst = std::max(worst, std::fabs(v - (i == j ? 1.0 : 0.0)));
        }
    CHECK(worst < 1e-6);
    for (int i = 0; i < cols; ++i)
        for (int j = 0; j < i; ++j) CHECK(u[size_t(i) * cols + j] == 0.0);

    const std::vector<float> w = random_vector<float>(size_t(rows) * cols, gen);
    for (Granularity granularity : {Granularity::Row, Granularity::Group, Granularity::Tensor}) {
        QuantSpec spec;
        spec.bits = 3, spec.granularity = granularity, spec.group_size = 16;
        CAPTURE(spec.describe());
        std::vector<double> identity(size_t(cols) * cols, 0.0);
        for (int i = 0; i < cols; ++i) identity[size_t(i) * cols + i] = 1.0;
        const QuantizedTensor rtn = quantize_cpu(w.data(), rows, cols, spec);
        const QuantizedTensor same = gptq_quantize(w.data(), rows, cols, identity, spec, GptqOptions{});
        CHECK(same.codes == rtn.codes);
        for (bool act_order : {false, true}) {
            if (act_order && granularity == Granularity::Group) continue;
            GptqOptions options;
            options.act_order = act_order;
            const QuantizedTensor g = gptq_quantize(w.data(), rows, cols, h, spec, options);
            const double gptq_error = output_error(x, n, w, g.dequantize(), rows, cols);
            const double rtn_error = output_error(x, n, w, rtn.dequantize(), rows, cols);
            CAPTURE(act_order);
            CHECK(gptq_error < 0.8 * rtn_error);
        }
    }
    QuantSpec group_spec;
    group_spec.bits = 4, group_spec.granularity = Granularity::Group, group_spec.group_size = 16;
    GptqOptions act_order;
    act_order.act_order = true;
    CHECK_THROWS_WITH_AS(gptq_quantize(w.data(), rows, cols, h, group_spec, act_order),
                         doctest::Contains("act-order"), Error);
}

TEST_CASE("GPU GPTQ matches the CPU reference (blocks, groups inside and across blocks, act-order, every rule)") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    struct Case {
        int rows, cols;
        QuantGrid grid;
        ScaleRule rule;
        Granularity granularity;
        int bits, group;
        bool act_order;
    };
    // 200 and 400 columns: blocks of 128 plus a partial one; groups of 40 (blocks of 120), 100
    // and 200 (a group spans two blocks of 100).
    const Case cases[] = {
        {100, 200, QuantGrid::Symmetric, ScaleRule::Absmax, Granularity::Row, 4, 0, false},
        {100, 200, QuantGrid::Symmetric, ScaleRule::Absmax, Granularity::Row, 4, 0, true},
        {70, 200, QuantGrid::Asymmetric, ScaleRule::Mse, Granularity::Group, 3, 40, false},
        {130, 200, QuantGrid::Centered, ScaleRule::Gaussian, Granularity::Group, 4, 100, false},
        {60, 400, QuantGrid::Symmetric, ScaleRule::Clip, Granularity::Group, 4, 200, false},
        {90, 200, QuantGrid::Symmetric, ScaleRule::Absmax, Granularity::Tensor, 8, 0, true},
    };
    for (const Case& c : cases) {
        QuantSpec spec;
        spec.bits = c.bits, spec.grid = c.grid, spec.rule = c.rule, spec.granularity = c.granularity;
        spec.group_size = c.group, spec.clip_ratio = 0.9f;
        GptqOptions options;
        options.act_order = c.act_order;
        CAPTURE(spec.describe());
        CAPTURE(c.act_order);
        const int samples = 2 * c.cols;
        std::vector<double> x;
        const std::vector<double> h = correlated_inputs(samples, c.cols, gen, x);
        const std::vector<float> w = random_vector<float>(size_t(c.rows) * c.cols, gen);
        const QuantizedTensor cpu = gptq_quantize(w.data(), c.rows, c.cols, h, spec, options);
        const QuantizedTensor gpu = gptq_quantize_gpu(w.data(), c.rows, c.cols, h, spec, options);
        REQUIRE(gpu.codes.size() == cpu.codes.size());
        REQUIRE(gpu.grids.size() == cpu.grids.size());
        size_t same = 0;
        for (size_t i = 0; i < cpu.codes.size(); ++i) same += gpu.codes[i] == cpu.codes[i];
        const double agreement = double(same) / double(cpu.codes.size());
        // fp32 sums vs float64 ones: a code at a rounding boundary may flip, and its error then
        // moves the row's later columns a little; what GPTQ minimises must not get worse.
        const double cpu_error = output_error(x, samples, w, cpu.dequantize(), c.rows, c.cols);
        const double gpu_error = output_error(x, samples, w, gpu.dequantize(), c.rows, c.cols);
        CAPTURE(agreement);
        CAPTURE(cpu_error);
        CAPTURE(gpu_error);
        CHECK(agreement > 0.97);
        CHECK(gpu_error < 1.02 * cpu_error);
        bool codes_in_range = true;
        for (int8_t code : gpu.codes) codes_in_range = codes_in_range && gpu.grids[0].code_min <= code && code <= gpu.grids[0].code_max;
        CHECK(codes_in_range);

        // With an identity Hessian no error moves: the GPU gives RTN's codes and grids exactly.
        std::vector<double> identity(size_t(c.cols) * c.cols, 0.0);
        for (int i = 0; i < c.cols; ++i) identity[size_t(i) * c.cols + i] = 1.0;
        const QuantizedTensor rtn = quantize_cpu(w.data(), c.rows, c.cols, spec);
        const QuantizedTensor same_as_rtn = gptq_quantize_gpu(w.data(), c.rows, c.cols, identity, spec, options);
        CHECK(same_as_rtn.codes == rtn.codes);
        bool grids_equal = true;
        for (size_t i = 0; i < rtn.grids.size(); ++i)
            grids_equal = grids_equal && same_as_rtn.grids[i].step == rtn.grids[i].step &&
                          same_as_rtn.grids[i].offset == rtn.grids[i].offset;
        CHECK(grids_equal);
    }
    // Not positive definite: the CPU's message, from cuSOLVER's report.
    const int cols = 64;
    std::vector<double> negative(size_t(cols) * cols, 0.0);
    for (int i = 0; i < cols; ++i) negative[size_t(i) * cols + i] = -1.0;
    const std::vector<float> w = random_vector<float>(size_t(8) * cols, gen);
    QuantSpec spec;
    spec.bits = 4;
    CHECK_THROWS_WITH_AS(gptq_quantize_gpu(w.data(), 8, cols, negative, spec, GptqOptions{}),
                         doctest::Contains("not positive definite"), Error);
    CHECK_THROWS_WITH_AS(gptq_quantize(w.data(), 8, cols, negative, spec, GptqOptions{}),
                         doctest::Contains("not positive definite"), Error);
}

TEST_CASE("Packed codes round-trip for every width") {
    std::mt19937_64 gen(fresh_seed());
    const std::vector<float> w = random_vector<float>(size_t(7) * 33, gen);
    for (int bits = 2; bits <= 8; ++bits) {
        QuantSpec spec;
        spec.bits = bits, spec.grid = bits % 2 ? QuantGrid::Asymmetric : QuantGrid::Centered;
        const QuantizedTensor q = quantize_cpu(w.data(), 7, 33, spec);
        CHECK(unpack_codes(pack_codes(q), 7, 33, bits) == q.codes);
    }
}

TEST_CASE("QAT forward equals the PTQ evaluation of the same weights (CPU, same quantizer code)") {
    for (const char* preset : {"olmo2-tiny", "gpt2-tiny"}) {
        CAPTURE(preset);
        const ModelConfig config = preset_config(preset);
        CpuModel<float> model(config);
        init_params(model.layout(), fresh_seed(), model.params().data());
        std::mt19937_64 gen(fresh_seed());
        std::vector<int> inputs(64), targets(64);
        for (auto& t : inputs) t = int(gen() % 1000);
        for (auto& t : targets) t = int(gen() % 1000);
        QuantOptions options;
        options.format = "w4a4";
        options.hadamard = 64;
        const LinearQuantConfig qat = resolve_linear_quant(options, QuantStyle::Quest);
        const std::vector<float> masters = model.params();
        model.set_linear_quant(qat);
        const double loss_qat = model.loss(inputs.data(), targets.data(), 2, 32);
        // PTQ: rotate and quantize every hidden weight offline, then only the inputs on the fly.
        for (const LinearMatrix& m : linear_matrices(config, model.layout())) {
            std::vector<float> w(masters.begin() + long(m.offset), masters.begin() + long(m.offset) + long(m.rows) * m.cols);
            hadamard_rows_cpu(w.data(), m.rows, m.cols, hadamard_block_for(m.cols, qat.hadamard_block));
            const std::vector<float> deq = quantize_cpu(w.data(), m.rows, m.cols, qat.weights).dequantize();
            std::copy(deq.begin(), deq.end(), model.params().begin() + long(m.offset));
        }
        LinearQuantConfig offline = qat;
        offline.weights_offline = true;
        model.set_linear_quant(offline);
        CHECK(model.loss(inputs.data(), targets.data(), 2, 32) == loss_qat);
    }
}

TEST_CASE("ptq binary: RTN and GPTQ on a trained tiny checkpoint; results row; packed checkpoint; bad input") {
    TempDir dir;
    TrainOptions o;
    const std::string checkpoint = trained_tiny_checkpoint(dir, 40, &o);
    const std::string results = dir / "ptq.jsonl";
    const std::string ptq = bin_dir() + "/ptq --device cpu --checkpoint " + checkpoint + " --calib-data " +
                            o.train_data + " --val-data " + o.val_data + " --val-batches 4 -b 4 --results " + results;
    std::string output;
    REQUIRE(run_command(ptq + " --format w8a8", output) == 0);
    CHECK(output.find("val loss w8a8") != std::string::npos);
    REQUIRE(run_command(ptq + " --format w4a4 --method gptq --calib-batches 4 --hadamard 32 --out " +
                            (dir / "q.safetensors"),
                        output) == 0);
    CAPTURE(output);
    const std::string text = read_file(results);
    std::vector<Json> rows;
    size_t start = 0;
    for (size_t end; (end = text.find('\n', start)) != std::string::npos; start = end + 1)
        rows.push_back(Json::parse(text.substr(start, end - start)));
    REQUIRE(rows.size() == 2);
    CHECK(rows[0].at("format").as_string() == "w8a8");
    CHECK(rows[0].at("optimizer").as_string() == "adamw");
    CHECK(std::fabs(rows[0].at("loss_increase").as_double()) < 0.05);  // 8 bits barely hurt
    CHECK(rows[1].at("method").as_string() == "gptq");
    CHECK(rows[1].at("val_loss_quantized").as_double() > 0);
    // The packed checkpoint: codes and scales reproduce the dequantized weights.
    const SafetensorsFile q = SafetensorsFile::load(dir / "q.safetensors");
    const ModelConfig config = ModelConfig::from_json(Json::parse(q.metadata().at("qopt_config")));
    const LinearQuantConfig quant = LinearQuantConfig::from_json(Json::parse(q.metadata().at("qopt_quant")));
    CHECK(quant.hadamard_block == 32);
    const std::string name = "layers.0.mlp.up.weight";
    const std::vector<int8_t> codes = unpack_codes(q.u8(name + ".qweight", {config.d_ff, config.d_model / 2}),
                                                   config.d_ff, config.d_model, 4);
    const std::vector<float> step = q.f32(name + ".step", {config.d_ff});
    const std::vector<float> offset = q.f32(name + ".offset", {config.d_ff});
    bool in_range = true;
    for (int8_t c : codes) in_range &= c >= -8 && c <= 7;
    CHECK(in_range);
    CHECK(step[0] > 0);
    CHECK(q.has("embed.weight"));
    CHECK(!q.has(name));

    CHECK(run_command(bin_dir() + "/ptq --checkpoint " + (dir / "missing"), output) != 0);
    CHECK(output.find("ptq: error:") != std::string::npos);
    CHECK(run_command(ptq + " --format w4", output) != 0);
    CHECK(output.find("wXaY") != std::string::npos);
    CHECK(run_command(ptq + " --method awq", output) != 0);
    CHECK(output.find("rtn or gptq") != std::string::npos);
}
