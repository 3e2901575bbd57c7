// Evaluation and analysis on the CPU: the harness-style multiple-choice readers and scorer
// (hand-made files; the batched, padded scorer against one unpadded forward per row),
// sampling and generation, the outlier metrics on known inputs, the error-propagation
// analysis's identities (R = A + B + C; b = 0 outside linear layers; G = G1 G2 exactly when
// only weights are quantized), quantized files that load to the loss ptq measured, and the
// eval / analyze binaries end to end with clear errors on bad input.
#include <cstring>
#include <sstream>
#include <fstream>
#include <map>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "data/loader.hpp"
#include "data/tokenizer.hpp"
#include "eval/error_propagation.hpp"
#include "eval/eval_model.hpp"
#include "eval/generate.hpp"
#include "eval/model_source.hpp"
#include "eval/multiple_choice.hpp"
#include "eval/outlier_metrics.hpp"
#include "helpers.hpp"
#include "model/cpu_model.hpp"
#include "model/params.hpp"
#include "quant/ptq.hpp"
#include "train/checkpoint.hpp"
#include "train_helpers.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

void write_text(const std::string& path, const std::string& text) {
    std::ofstream(path, std::ios::binary) << text;
}

// An llm.c eval file (dev/data/data_common.py's layout) from examples.
std::string llmc_eval_bytes(const std::vector<ChoiceExample>& examples) {
    std::vector<uint16_t> stream;
    int longest = 0;
    for (size_t e = 0; e < examples.size(); ++e) {
        const size_t start = stream.size();
        stream.push_back(65535);
        stream.push_back(0);
        stream.push_back(uint16_t(e));
        stream.push_back(uint16_t(examples[e].label));
        stream.push_back(uint16_t(examples[e].completions.size()));
        stream.push_back(uint16_t(examples[e].context.size()));
        for (int t : examples[e].context) stream.push_back(uint16_t(t));
        for (const auto& c : examples[e].completions) {
            stream.push_back(uint16_t(c.size()));
            for (int t : c) stream.push_back(uint16_t(t));
        }
        stream[start + 1] = uint16_t((stream.size() - start) * 2);
        longest = std::max(longest, int((stream.size() - start) * 2));
    }
    int32_t header[256] = {};
    header[0] = 20240522, header[1] = 1, header[2] = int32_t(examples.size()), header[3] = longest;
    std::string bytes(reinterpret_cast<const char*>(header), sizeof header);
    bytes.append(reinterpret_cast<const char*>(stream.data()), stream.size() * 2);
    return bytes;
}


}  // namespace

TEST_CASE("HellaSwag preprocessing follows the harness") {
    CHECK(hellaswag_preprocess("  A man [title] is seen.  ") == "A man. is seen.");
    CHECK(hellaswag_preprocess("drops [header] the ball [step] now") == "drops the ball now");
    CHECK(hellaswag_preprocess("two  spaces and   three") == "two spaces and  three");
}

TEST_CASE("choice accuracy: acc by the sum, acc_norm by the sum per character") {
    std::vector<ChoiceExample> examples(2);
    examples[0].label = 1, examples[0].completion_lengths = {1, 10};
    examples[1].label = 0, examples[1].completion_lengths = {2, 2};
    // Example 0: choice 0 has the larger sum (-2 > -5) but the smaller per-character score.
    const ChoiceResult r = choice_accuracy(examples, {{-2.0, -5.0}, {-1.0, -3.0}});
    CHECK(r.acc == doctest::Approx(0.5));
    CHECK(r.acc_norm == doctest::Approx(1.0));
    CHECK(r.acc_stderr == doctest::Approx(std::sqrt(0.25 / 1.0)));
}

TEST_CASE("task readers: generic JSONL, HellaSwag JSONL, llm.c .bin; errors name the problem") {
    const std::string vocab_dir = data_dir() + "/gpt2";
    if (!is_directory(vocab_dir)) {
        MESSAGE("skipped: no GPT-2 vocabulary at " << vocab_dir << " (run make setup)");
        return;
    }
    const Tokenizer tokenizer = Tokenizer::load_dir(vocab_dir);
    TempDir dir;
    write_text(dir / "choices.jsonl",
               "{\"context\": \"The capital of France is\", \"choices\": [\"Paris\", \"a banana\"], \"label\": 0}\n\n"
               "{\"context\": \"Question: 2+2? Answer:\", \"choices\": [\"4\", \"5\", \"22\"], \"label\": \"0\"}\n");
    const auto examples = read_choice_task(dir / "choices.jsonl", "auto", &tokenizer);
    REQUIRE(examples.size() == 2);
    CHECK(examples[0].context == tokenizer.encode("The capital of France is"));
    CHECK(examples[0].completions[0] == tokenizer.encode(" Paris"));
    CHECK(examples[0].completion_lengths[1] == 8.0);  // "a banana"
    CHECK(examples[1].completions.size() == 3);

    write_text(dir / "hs.jsonl",
               "{\"ind\": 4, \"activity_label\": \"Removing ice from car\", \"ctx_a\": \"Then, the man writes over "
               "the snow.\", \"ctx_b\": \"then\", \"endings\": [\", the man continues [title] removing.\", \" is "
               "seen.\", \"x\", \"y\"], \"label\": \"3\"}\n");
    const auto hs = read_choice_task(dir / "hs.jsonl", "auto", &tokenizer);
    REQUIRE(hs.size() == 1);
    CHECK(hs[0].label == 3);
    CHECK(hs[0].context ==
          tokenizer.encode("Removing ice from car: Then, the man writes over the snow. Then"));
    CHECK(hs[0].completions[0] == tokenizer.encode(" , the man continues. removing."));

    // The .bin form of the same examples reads back the same tokens; lengths from the decoded text.
    write_text(dir / "hs.bin", llmc_eval_bytes(examples));
    const auto from_bin = read_choice_task(dir / "hs.bin", "auto", &tokenizer);
    REQUIRE(from_bin.size() == 2);
    CHECK(from_bin[1].context == examples[1].context);
    CHECK(from_bin[1].completions == examples[1].completions);
    CHECK(from_bin[0].completion_lengths == examples[0].completion_lengths);

    std::string bytes = llmc_eval_bytes(examples);
    write_text(dir / "truncated.bin", bytes.substr(0, bytes.size() - 4));
    CHECK_THROWS_WITH_AS(read_llmc_eval_bin(dir / "truncated.bin", nullptr), doctest::Contains("truncated"), Error);
    bytes[0] = 'X';
    write_text(dir / "magic.bin", bytes);
    CHECK_THROWS_WITH_AS(read_llmc_eval_bin(dir / "magic.bin", nullptr), doctest::Contains("bad magic"), Error);
    write_text(dir / "bad.jsonl", "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"label\": 5}\n");
    CHECK_THROWS_WITH_AS(read_choices_jsonl(dir / "bad.jsonl", tokenizer), doctest::Contains("bad.jsonl:1"), Error);
    write_text(dir / "broken.jsonl", "{\"context\": \"a\", \n");
    CHECK_THROWS_AS(read_choices_jsonl(dir / "broken.jsonl", tokenizer), Error);
}

TEST_CASE("score_choices: batched and padded rows give each row's unpadded log-likelihood") {
    const ModelConfig config = small_vocab_config("olmo2-tiny");
    std::unique_ptr<EvalModel> model = make_eval_model(config, "cpu");
    std::vector<float> params(ParamLayout::build(config).total);
    init_params(ParamLayout::build(config), fresh_seed(), params.data());
    model->set_params(params);
    std::mt19937_64 gen(fresh_seed());
    std::vector<ChoiceExample> examples(3);
    for (auto& e : examples) {
        e.context = random_tokens(1 + gen() % 20, config.vocab_size, gen);
        for (int c = 0; c < 3; ++c) {
            e.completions.push_back(random_tokens(1 + gen() % 6, config.vocab_size, gen));
            e.completion_lengths.push_back(double(e.completions.back().size()));
        }
        e.label = int(gen() % 3);
    }
    examples[2].context.assign(70, 5);  // longer than max_seq_len: left-truncated
    const ChoiceResult r = score_choices(*model, examples, 4);
    for (size_t e = 0; e < examples.size(); ++e)
        for (size_t c = 0; c < 3; ++c) {
            std::vector<int> row = examples[e].context;
            row.insert(row.end(), examples[e].completions[c].begin(), examples[e].completions[c].end());
            if (row.size() > size_t(config.max_seq_len) + 1) row.erase(row.begin(), row.end() - config.max_seq_len - 1);
            const std::vector<int> inputs(row.begin(), row.end() - 1), targets(row.begin() + 1, row.end());
            model->loss(inputs.data(), targets.data(), 1, int(inputs.size()));
            const std::vector<float> losses = model->token_losses();
            double expected = 0;
            for (size_t t = row.size() - 1 - examples[e].completions[c].size(); t < inputs.size(); ++t)
                expected -= losses[t];
            CHECK(r.log_likelihoods[e][c] == doctest::Approx(expected).epsilon(1e-5));
        }
}

TEST_CASE("sampling: greedy is the argmax, top-1 too; temperature sampling follows the softmax") {
    Rng rng(fresh_seed());
    const std::vector<float> logits = {0.5f, 2.0f, 1.0f, -1.0f};
    CHECK(sample_token(logits, {}, rng) == 1);
    CHECK(sample_token(logits, {1.0, 1}, rng) == 1);
    std::vector<int> counts(4, 0);
    const int draws = 40000;
    for (int i = 0; i < draws; ++i) ++counts[size_t(sample_token(logits, {1.0, 3}, rng))];
    CHECK(counts[3] == 0);  // outside the top 3
    double z = std::exp(0.5) + std::exp(2.0) + std::exp(1.0);
    CHECK(counts[1] / double(draws) == doctest::Approx(std::exp(2.0) / z).epsilon(0.03));
    CHECK(counts[0] / double(draws) == doctest::Approx(std::exp(0.5) / z).epsilon(0.05));
    std::vector<float> bad = logits;
    bad[2] = std::nanf("");
    CHECK_THROWS_AS(sample_token(bad, {}, rng), Error);
}

TEST_CASE("greedy generation picks, at every step, the token of least loss") {
    const ModelConfig config = small_vocab_config("gpt2-tiny");
    const ParamLayout layout = ParamLayout::build(config);
    std::vector<float> params(layout.total);
    init_params(layout, fresh_seed(), params.data());
    std::unique_ptr<EvalModel> model = make_eval_model(config, "cpu");
    model->set_params(params);
    std::mt19937_64 gen(fresh_seed());
    const std::vector<int> prompt = random_tokens(5, config.vocab_size, gen);
    GenerateOptions options;
    options.max_new_tokens = 70;  // past max_seq_len: the window slides
    const std::vector<int> out = generate(*model, params.data() + layout.embed, prompt, options);
    REQUIRE(out.size() == 70);
    std::vector<int> sequence = prompt;
    for (size_t step : {size_t(0), size_t(1), size_t(40)}) {
        std::vector<int> prefix(prompt);
        prefix.insert(prefix.end(), out.begin(), out.begin() + long(step));
        // Every possible next token as the target at the last position, one row each.
        const int V = config.vocab_size, T = int(prefix.size());
        std::vector<int> inputs, targets;
        for (int v = 0; v < V; ++v) {
            inputs.insert(inputs.end(), prefix.begin(), prefix.end());
            targets.insert(targets.end(), prefix.begin() + 1, prefix.end());
            targets.push_back(v);
        }
        model->loss(inputs.data(), targets.data(), V, T);
        const std::vector<float> losses = model->token_losses();
        int best = 0;
        for (int v = 1; v < V; ++v)
            if (losses[size_t(v) * T + T - 1] < losses[size_t(best) * T + T - 1]) best = v;
        CAPTURE(step);
        CHECK(out[step] == best);
    }
}

TEST_CASE("outlier metrics on known inputs; spectral norm by power iteration") {
    // Row [1, -1, 1, 4]: |x| max 4, median 1, mean 7/4; central moments about 5/4:
    // m2 = 12.75 / 4, m4 = 82.828125 / 4, kurtosis m4 / m2^2.
    const std::vector<float> row = {1, -1, 1, 4};
    const RowStatsSum s = row_outlier_stats(row.data(), 1, 4);
    CHECK(s.mean_mmr_median() == doctest::Approx(4.0));
    CHECK(s.mean_mmr_mean() == doctest::Approx(4.0 / 1.75));
    CHECK(s.mean_kurtosis() == doctest::Approx((82.828125 / 4) / ((12.75 / 4) * (12.75 / 4))));
    const std::vector<float> gaussian = [] {
        std::mt19937_64 gen(fresh_seed());
        return random_vector<float>(200000, gen);
    }();
    CHECK(kurtosis(gaussian.data(), gaussian.size()) == doctest::Approx(3.0).epsilon(0.05));
    const std::vector<float> zeros(8, 0.0f);
    CHECK(row_outlier_stats(zeros.data(), 2, 4).skipped == 2);

    // diag(3, 2, 1) padded to 3 x 4, and a rank-1 u v^T with ||u|| ||v|| known.
    std::vector<float> diag(12, 0.0f);
    diag[0] = 3, diag[5] = -2, diag[10] = 1;
    CHECK(spectral_norm(diag.data(), 3, 4) == doctest::Approx(3.0).epsilon(1e-5));
    std::mt19937_64 gen(fresh_seed());
    const std::vector<double> u = random_vector<double>(7, gen), v = random_vector<double>(5, gen);
    std::vector<float> rank1(35);
    double nu = 0, nv = 0;
    for (int i = 0; i < 7; ++i) nu += u[size_t(i)] * u[size_t(i)];
    for (int j = 0; j < 5; ++j) nv += v[size_t(j)] * v[size_t(j)];
    for (int i = 0; i < 7; ++i)
        for (int j = 0; j < 5; ++j) rank1[size_t(i) * 5 + j] = float(u[size_t(i)] * v[size_t(j)]);
    CHECK(spectral_norm(rank1.data(), 7, 5) == doctest::Approx(std::sqrt(nu * nv)).epsilon(1e-5));
}

TEST_CASE("error propagation (CPU): R = A + B + C, b = 0 outside linear layers, G = G1 G2 for weights alone") {
    for (const char* preset : {"olmo2-tiny", "gpt2-tiny"}) {
        CAPTURE(preset);
        const ModelConfig config = small_vocab_config(preset);
        const ParamLayout layout = ParamLayout::build(config);
        std::vector<float> params(layout.total);
        init_params(layout, fresh_seed(), params.data());
        std::unique_ptr<EvalModel> model = make_eval_model(config, "cpu");
        model->set_params(params);
        std::mt19937_64 gen(fresh_seed());
        const std::vector<std::vector<int>> inputs = {random_tokens(64, config.vocab_size, gen),
                                                      random_tokens(64, config.vocab_size, gen)};
        const std::vector<std::vector<int>> targets = {random_tokens(64, config.vocab_size, gen),
                                                       random_tokens(64, config.vocab_size, gen)};
        for (const char* format : {"w4a4", "w4a16"}) {
            CAPTURE(format);
            QuantOptions options;
            options.format = format;
            options.hadamard = 32;
            const LinearQuantConfig quant = resolve_linear_quant(options, QuantStyle::Rtn);
            const PropagationResult r = analyze_error_propagation(*model, params, quant, inputs, targets, 2, 32);
            REQUIRE(r.modules.size() == size_t(2 + 10 * config.n_layers));
            CHECK(r.modules.front().R == 0.0);
            CHECK(r.loss_quantized != r.loss_full);
            for (const ModuleRecord& m : r.modules) {
                CAPTURE(module_name(m.module));
                CAPTURE(m.layer);
                CHECK(m.R == doctest::Approx(m.A + m.B + m.C).epsilon(1e-6));
                if (m.site < 0) {
                    CHECK(m.B == 0.0);
                    CHECK(m.A == m.R);
                    continue;
                }
                CHECK(m.B > 0);
                CHECK(m.local_error > 0);
                CHECK(m.G1 == doctest::Approx(1.0).epsilon(0.1));
                CHECK(m.weight_quant_error > 0.01);
                CHECK(m.input_kurtosis > 0);
                if (m.G < 0) continue;
                // With weights alone quantized a = dh M^T exactly: G = G1 G2 (bias-free layers).
                if (std::string(format) == "w4a16" && config.arch == Arch::Olmo2)
                    CHECK(m.G == doctest::Approx(m.G1 * m.G2).epsilon(1e-4));
            }
            const Json summary = r.summary();
            CHECK(summary.at("R_final_norm").as_double() > 0);
            CHECK(summary.contains("mmr_median_mean"));
        }
    }
}

TEST_CASE("a quantized file from ptq loads to the loss ptq measured; damaged files are refused") {
    TempDir dir;
    TrainOptions o;
    const std::string checkpoint = trained_tiny_checkpoint(dir, 20, &o);
    PtqOptions p;
    p.checkpoint = checkpoint;
    p.quant.format = "w4a4";
    p.quant.hadamard = 64;
    p.val_data = o.val_data;
    p.val_batches = 3, p.batch_size = 2, p.seq_len = 32;
    p.device = "cpu";
    p.out = dir / "q.safetensors";
    p.results = dir / "ptq.jsonl";
    std::ostringstream log;
    const PtqResult result = run_ptq(p, log);
    const EvalCheckpoint loaded = load_eval_checkpoint(p.out);
    CHECK(loaded.quantized_file);
    CHECK(loaded.optimizer == "adamw");
    CHECK(loaded.step == 20);
    std::unique_ptr<EvalModel> model = make_eval_model(loaded.config, "cpu");
    model->set_params(loaded.params);
    model->set_linear_quant(loaded.quant);
    TokenLoader val(p.val_data, loaded.config.vocab_size, 2, 32, "val");
    CHECK(mean_loss(*model, val, 3, 2, 32) == doctest::Approx(result.val_loss_quantized).epsilon(1e-6));

    std::string bytes = read_file(p.out);
    write_text(dir / "cut.safetensors", bytes.substr(0, bytes.size() / 2));
    CHECK_THROWS_AS(load_eval_checkpoint(dir / "cut.safetensors"), Error);
    CHECK_THROWS_WITH_AS(load_eval_checkpoint(dir / "missing"), doctest::Contains("no such checkpoint"), Error);
}

TEST_CASE("eval and analyze binaries on a tiny checkpoint; bad input gives one clear line") {
    TempDir dir;
    TrainOptions o;
    const std::string checkpoint = trained_tiny_checkpoint(dir, 10, &o);
    std::string output;
    const std::string common = " --checkpoint " + checkpoint + " --device cpu --threads 2";
    REQUIRE(run_command(bin_dir() + "/eval" + common + " --val-data " + o.val_data +
                            " --val-batches 2 --batch-size 2 --seq-len 32 --results " + (dir / "eval.jsonl"),
                        output) == 0);
    CHECK(output.find("val loss") != std::string::npos);
    const Json row = Json::parse(read_file(dir / "eval.jsonl"));
    CHECK(row.at("optimizer").as_string() == "adamw");
    CHECK(row.at("val_loss").as_double() > 0);

    REQUIRE(run_command(bin_dir() + "/analyze" + common + " --calib-data " + o.train_data +
                            " --batch-size 2 --seq-len 32 --hadamard 64 --out " + (dir / "a.json") + " --results " +
                            (dir / "a.jsonl"),
                        output) == 0);
    const Json analysis = Json::parse(read_file(dir / "a.json"));
    CHECK(analysis.at("modules").size() == 22);
    CHECK(Json::parse(read_file(dir / "a.jsonl")).at("R_final_norm").as_double() > 0);

    CHECK(run_command(bin_dir() + "/eval --checkpoint " + (dir / "nothing"), output) == 1);
    CHECK(output.find("no such checkpoint") != std::string::npos);
    CHECK(run_command(bin_dir() + "/eval" + common + " --val-batches 0 --task " + (dir / "none.jsonl"), output) == 1);
    CHECK(output.find("none.jsonl") != std::string::npos);
    CHECK(run_command(bin_dir() + "/analyze" + common + " --format off", output) == 1);
    CHECK(output.find("quantizes nothing") != std::string::npos);
    CHECK(run_command(bin_dir() + "/eval --checkpoint x --temperature abc", output) != 0);
    CHECK(run_command(bin_dir() + "/eval" + common + " --val-batches 0 --integer", output) == 1);
    CHECK(output.find("--integer needs a quantized evaluation") != std::string::npos);
    CHECK(run_command(bin_dir() + "/eval" + common + " --val-batches 0 --format w8a8 --integer", output) == 1);
    CHECK(output.find("GPU only") != std::string::npos);
}

TEST_CASE("GPU eval --integer: W8A8 in integers and as fake-quant give the same loss within rounding") {
    if (!gpu_available()) {
        MESSAGE("skipped: " << query_cuda_device().problem << " (GPU test)");
        return;
    }
    TempDir dir;
    TrainOptions o;
    const std::string checkpoint = trained_tiny_checkpoint(dir, 10, &o);
    std::string output;
    double losses[2];
    for (int integer = 0; integer < 2; ++integer) {
        const std::string results = dir / ("int" + std::to_string(integer) + ".jsonl");
        REQUIRE(run_command(bin_dir() + "/eval --checkpoint " + checkpoint + " --device cuda --format w8a8 --val-data " +
                                o.val_data + " --val-batches 2 --batch-size 2 --seq-len 32 --results " + results +
                                (integer ? " --integer" : ""),
                            output) == 0);
        const Json r = Json::parse(read_file(results));
        CHECK(r.at("execution").as_string() == (integer ? "integer" : "fake-quant"));
        losses[integer] = r.at("val_loss").as_double();
    }
    CHECK(std::fabs(losses[1] - losses[0]) < 2e-3 * losses[0]);
}

namespace {

// The python3 that has the report's modules (Debian's), or empty.
std::string python_with(const char* modules) {
    for (const char* python : {"/usr/bin/python3", "python3"}) {
        std::string output;
        if (run_command(std::string(python) + " -c 'import " + modules + "'", output) == 0) return python;
    }
    return "";
}

}  // namespace

TEST_CASE("sweep driver: bad configs refused; a tiny CPU sweep runs, resumes without rerunning, and reports") {
    const std::string python = python_with("json");
    if (python.empty()) {
        MESSAGE("skipped: no python3 (sweep driver test)");
        return;
    }
    TempDir dir;
    const std::string sweep = python + " tools/sweep.py ";
    std::string output;
    write_text(dir / "bad.json", "{\"name\": \"x\", \"out_dir\": \"o\", \"models\": [\"olmo2-tiny\"], \"optimizers\": "
                                 "[\"adamw\"], \"train\": {\"steps\": 1}, \"colour\": 1}");
    CHECK(run_command(sweep + (dir / "bad.json"), output) == 2);
    CHECK(output.find("unknown key(s) colour") != std::string::npos);
    write_text(dir / "bad2.json", "{\"name\": \"x\", \"out_dir\": \"o\", \"models\": [\"olmo2-tiny\"], \"optimizers\": "
                                  "[\"adamw\"], \"train\": {\"steps\": 1, \"tokens\": 5}}");
    CHECK(run_command(sweep + (dir / "bad2.json"), output) == 2);
    CHECK(output.find("exactly one of steps") != std::string::npos);
    write_text(dir / "broken.json", "{\"name\": ");
    CHECK(run_command(sweep + (dir / "broken.json"), output) == 2);
    CHECK(output.find("invalid JSON") != std::string::npos);

    const std::string data = data_dir() + "/brown";
    if (!is_directory(data)) {
        MESSAGE("skipped: no Brown shards at " << data << " (run make setup)");
        return;
    }
    write_text(dir / "tiny.json",
               "{\"name\": \"tiny\", \"out_dir\": \"" + (dir / "out") + "\", \"bin_dir\": \"" + bin_dir() +
                   "\", \"device\": \"cpu\", \"train_data\": \"" + data + "/brown_train_*.bin\", \"val_data\": \"" +
                   data + "/brown_val_*.bin\", \"models\": [{\"name\": \"t\", \"preset\": \"olmo2-tiny\", "
                   "\"max_seq_len\": 32}], \"optimizers\": [\"adamw\", \"muon\"], \"qat\": [\"off\", \"w4a4\"], "
                   "\"train\": {\"steps\": 4, \"batch_size\": 2, \"seq_len\": 32, \"val_batches\": 2}, "
                   "\"ptq\": [{\"format\": \"w4a4\"}], \"eval\": {\"val_batches\": 2}, "
                   "\"analyze\": {\"format\": \"w4a4\", \"batch_size\": 2}, \"common_loss\": {\"eval_every\": 1}}");
    REQUIRE(run_command(sweep + (dir / "tiny.json") + " --parallel 2", output) == 0);
    CAPTURE(output);
    auto rows = [&] {
        std::vector<Json> out;
        std::istringstream text(read_file(dir / "out/results.jsonl"));
        for (std::string line; std::getline(text, line);)
            if (!line.empty()) out.push_back(Json::parse(line));
        return out;
    };
    // Per optimizer: off: train, eval, ptq, analyze; w4a4: train, eval; common loss: train, ptq.
    const std::vector<Json> first = rows();
    REQUIRE(first.size() == 16);
    int analyses = 0;
    std::map<std::string, double> best_loss;  // per optimizer, its full-precision run's best validation loss
    for (const Json& r : first) {
        CHECK(r.at("sweep").as_string() == "tiny");
        analyses += r.at("job").as_string() == "analyze";
        if (r.at("job").as_string() == "train" && r.at("protocol").as_string() == "budget" &&
            r.at("qat").as_string() == "off") {
            std::istringstream metrics(read_file(dir / ("out/runs/" + r.at("run").as_string() + "/metrics.jsonl")));
            double best = INFINITY;
            for (std::string line; std::getline(metrics, line);) {
                const Json m = Json::parse(line);
                if (m.at("type").as_string() == "val") best = std::min(best, m.at("val_loss").as_double());
            }
            best_loss[r.at("optimizer").as_string()] = best;
        }
    }
    CHECK(analyses == 2);
    REQUIRE(best_loss.size() == 2);
    // The common-loss target is the larger best loss; both CL runs stopped at or below it.
    const double target = std::max(best_loss["adamw"], best_loss["muon"]);
    int cl_trains = 0, cl_ptqs = 0;
    for (const Json& r : first) {
        if (r.at("protocol").as_string() != "common_loss") continue;
        CHECK(r.at("target_loss").as_double() == target);
        if (r.at("job").as_string() == "train") {
            ++cl_trains;
            CHECK(r.at("val_loss").as_double() <= target);
            CHECK(r.at("steps").as_int() <= 4);
        }
        cl_ptqs += r.at("job").as_string() == "ptq";
    }
    CHECK(cl_trains == 2);
    CHECK(cl_ptqs == 2);
    REQUIRE(run_command(sweep + (dir / "tiny.json"), output) == 0);
    CHECK(output.find("/train:") == std::string::npos);  // nothing ran again
    CHECK(rows().size() == 16);

    const std::string report_python = python_with("numpy, scipy, matplotlib");
    if (report_python.empty()) {
        MESSAGE("skipped: no python3 with numpy, scipy and matplotlib (study report)");
        return;
    }
    REQUIRE(run_command(report_python + " tools/study_report.py " + (dir / "out") + " --markdown " + (dir / "r.md"),
                        output) == 0);
    const std::string report = read_file(dir / "r.md");
    CHECK(report.find("| t | ") != std::string::npos);
    CHECK(report.find("PTQ at a common loss") != std::string::npos);
    CHECK(file_exists(dir / "out/report/ptq_degradation.png"));
}
