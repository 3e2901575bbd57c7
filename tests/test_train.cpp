// The training loop: loss falls, exact resume, determinism, NaN handling, and bad input
// through the real `train` binary (one clear line, non-zero exit, no checkpoint left).
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>

#include <sstream>
#include <thread>

#include "core/error.hpp"
#include "core/files.hpp"
#include "core/json.hpp"
#include "helpers.hpp"
#include "train_helpers.hpp"
#include "kernels/device.hpp"
#include "kernels/gpu.hpp"
#include "train/checkpoint.hpp"
#include "train/trainer.hpp"

using namespace qopt;
using namespace qopt::test;

TEST_CASE("a short training run's loss falls well below its start") {
    TempDir dir;
    std::ostringstream log;
    TrainOptions o = tiny_run(dir, 60);
    const TrainResult r = run_training(o, log);
    INFO(log.str());
    REQUIRE(r.train_losses.size() == 60);
    CHECK(r.train_losses.front() == doctest::Approx(std::log(64.0)).epsilon(0.05));
    CHECK(r.val_loss_end < r.val_loss_start - 1.5);  // log(64) = 4.16; the pattern is learnable
    CHECK(file_exists(o.out_dir + "/metrics.jsonl"));
    CHECK(list_checkpoints(o.out_dir).size() == 1);
}

TEST_CASE("exact resume: N steps + resume + N steps == 2N steps, bit for bit (CPU and GPU)") {
    TempDir dir;
    std::ostringstream log;
    for (const std::string& device : devices())
        for (const char* preset : {"olmo2-tiny", "gpt2-tiny"}) {
            CAPTURE(device);
            CAPTURE(preset);
            TrainOptions full = tiny_run(dir, 12);
            full.device = device;
            full.preset = preset;
            full.grad_accum = 2;
            check_exact_resume(full, 6, std::string(preset) + device, log);
        }
}

TEST_CASE("--resume auto continues from the newest checkpoint, or starts fresh without one") {
    TempDir dir;
    std::ostringstream log;
    TrainOptions o = tiny_run(dir, 4);
    o.resume = "auto";
    run_training(o, log);
    CHECK(log.str().find("starting fresh") != std::string::npos);
    o.steps = 6;  // extend the run; the schedule is recomputed for 6 steps
    const TrainResult r = run_training(o, log);
    CHECK(r.train_losses.size() == 2);
    CHECK(log.str().find("resumed from") != std::string::npos);
}

TEST_CASE("two runs with the same seed give identical losses (CPU and GPU)") {
    TempDir dir;
    std::ostringstream log;
    for (const std::string& device : devices()) {
        CAPTURE(device);
        TrainOptions o = tiny_run(dir, 5);
        o.device = device;
        o.out_dir = dir / ("first_" + device);
        const TrainResult a = run_training(o, log);
        o.out_dir = dir / ("again_" + device);
        const TrainResult b = run_training(o, log);
        CHECK(a.train_losses == b.train_losses);
        CHECK(a.val_loss_end == b.val_loss_end);
    }
}

TEST_CASE("non-finite steps are skipped and counted, or stop the run with a checkpoint") {
    TempDir dir;
    std::ostringstream log;
    TrainOptions o = tiny_run(dir, 3);
    o.optim.lr = 1e30;  // the first update overflows the weights, so later losses are not finite
    o.warmup_steps = 0;
    o.grad_clip = 0;
    const TrainResult r = run_training(o, log);
    CHECK(r.skipped_steps >= 1);
    CHECK(log.str().find("update skipped") != std::string::npos);
    o.nan_policy = "stop";
    o.out_dir = dir / "stop";
    CHECK_THROWS_WITH_AS(run_training(o, log), doctest::Contains("stopping on a non-finite step"), Error);
    CHECK(list_checkpoints(o.out_dir).size() == 1);
}

TEST_CASE("option validation names the flag") {
    TempDir dir;
    std::ostringstream log;
    auto expect = [&](TrainOptions o, const char* message) {
        CAPTURE(message);
        CHECK_THROWS_WITH_AS(run_training(o, log), doctest::Contains(message), Error);
        CHECK(list_checkpoints(o.out_dir).empty());
    };
    TrainOptions base = tiny_run(dir, 3);
    auto with = [&](auto change) {
        TrainOptions o = base;
        change(o);
        return o;
    };
    expect(with([](TrainOptions& o) { o.batch_size = 0; }), "--batch-size must be positive");
    expect(with([](TrainOptions& o) { o.seq_len = -1; }), "--seq-len must be positive");
    expect(with([](TrainOptions& o) { o.steps = 0; }), "give a positive --steps or --tokens");
    expect(with([](TrainOptions& o) { o.steps = -5; }), "--steps");
    expect(with([](TrainOptions& o) { o.seq_len = 64; }), "--seq-len 64 exceeds the model's max_seq_len 32");
    expect(with([](TrainOptions& o) { o.preset = "olmo9"; }), "unknown preset 'olmo9'");
    expect(with([](TrainOptions& o) { o.optimizer = "sgd"; }), "unknown --optimizer 'sgd'");
    expect(with([](TrainOptions& o) { o.optim.scion.momentum = 0; }), "--scion-momentum must be in (0, 1]");
    expect(with([](TrainOptions& o) { o.optim.shampoo.block_size = 0; }), "--shampoo-block-size must be positive");
    expect(with([](TrainOptions& o) { o.device = "tpu"; }), "--device must be cpu, cuda or auto");
    expect(with([](TrainOptions& o) { o.train_data = ""; }), "--train-data is required");
    expect(with([&](TrainOptions& o) { o.train_data = dir / "missing_*.bin"; }), "--train-data: no file matches");
    expect(with([](TrainOptions& o) { o.n_heads = 5; }), "not divisible by n_heads 5");
    expect(with([](TrainOptions& o) { o.optim.lr = -1; }), "--lr must be positive");
    expect(with([](TrainOptions& o) { o.vocab_size = 10; }), "is not below the vocabulary size 10");
    expect(with([](TrainOptions& o) { o.target_loss = 3; }), "--target-loss needs --val-data and --eval-every");
    expect(with([](TrainOptions& o) { o.target_loss = -1; }), "--target-loss must be a non-negative number");
}

TEST_CASE("--target-loss stops at the first validation at or below it: the full run cut short (common loss)") {
    TempDir dir;
    std::ostringstream log;
    TrainOptions full = tiny_run(dir, 30);
    full.eval_every = 5;
    full.out_dir = dir / "full";
    const TrainResult whole = run_training(full, log);
    // The validation losses of the full run at steps 5, 10, ...: the target is the one at step 15.
    std::vector<double> val_losses;
    std::istringstream metrics(read_file(full.out_dir + "/metrics.jsonl"));
    for (std::string line; std::getline(metrics, line);) {
        const Json record = Json::parse(line);
        if (record.at("type").as_string() == "val") val_losses.push_back(record.at("val_loss").as_double());
    }
    REQUIRE(val_losses.size() == 7);  // start, 5, 10, ..., 25, end
    REQUIRE(val_losses[3] < *std::min_element(val_losses.begin(), val_losses.begin() + 3));
    TrainOptions cut = full;
    cut.out_dir = dir / "cut";
    cut.target_loss = val_losses[3];
    const TrainResult r = run_training(cut, log);
    CHECK(r.reached_target);
    CHECK(r.final_step == 15);
    CHECK(r.val_loss_end == val_losses[3]);
    CHECK(std::equal(r.train_losses.begin(), r.train_losses.end(), whole.train_losses.begin()));
    CHECK(log.str().find("reached the target validation loss") != std::string::npos);
    CHECK(read_file(cut.out_dir + "/metrics.jsonl").find("\"type\":\"target\"") != std::string::npos);
    REQUIRE(list_checkpoints(cut.out_dir).size() == 1);
    CHECK(read_checkpoint(list_checkpoints(cut.out_dir)[0]).state.step == 15);
    // Resumed with the same target: it is still reached, so nothing more is trained.
    cut.resume = "auto";
    const TrainResult again = run_training(cut, log);
    CHECK(again.reached_target);
    CHECK(again.train_losses.empty());
    CHECK(again.final_step == 15);
    // A target below anything reached: the whole budget runs, and the log says so.
    TrainOptions unreachable = full;
    unreachable.out_dir = dir / "unreachable";
    unreachable.target_loss = 1e-3;
    std::ostringstream log2;
    const TrainResult u = run_training(unreachable, log2);
    CHECK(!u.reached_target);
    CHECK(u.final_step == 30);
    CHECK(u.val_loss_end == whole.val_loss_end);
    CHECK(log2.str().find("was not reached") != std::string::npos);
}

TEST_CASE("a checkpoint from a different model config is refused") {
    TempDir dir;
    std::ostringstream log;
    TrainOptions o = tiny_run(dir, 2);
    const TrainResult r = run_training(o, log);
    TrainOptions other = o;
    other.d_model = 32;
    other.out_dir = dir / "other";
    other.resume = r.last_checkpoint;
    CHECK_THROWS_WITH_AS(run_training(other, log),
                         doctest::Contains("checkpoint was written for a different model (d_model 32 vs 64"), Error);
    // ... and so is one written by another optimizer.
    TrainOptions muon = o;
    muon.optimizer = "muon";
    muon.out_dir = dir / "muon";
    muon.resume = r.last_checkpoint;
    CHECK_THROWS_WITH_AS(run_training(muon, log), doctest::Contains("checkpoint was written by --optimizer adamw"),
                         Error);
}

TEST_CASE("the train binary: bad input gives one clear line and a non-zero exit") {
    const std::string train = bin("train");
    if (!file_exists(train)) {
        MESSAGE("skipped: " << train << " not built (run through `make test`)");
        return;
    }
    TempDir dir;
    write_shard(dir / "good.bin", synthetic_tokens(5000, 64, 1));
    std::string bad(1024 + 8, '\0');
    write_file_atomic(dir / "badmagic.bin", bad);
    write_file_atomic(dir / "blocker", "a file where a directory is expected");
    const std::string base = train + " --preset olmo2-tiny --vocab-size 64 --steps 2 -b 2 -t 16 --val-data '' --out-dir " +
                             dir.path + "/out";
    struct Case {
        std::string args, message;
    };
    const std::vector<Case> cases = {
        {"--train-data '" + dir.path + "/nothing_*.bin'", "no file matches"},
        {"--train-data ''", "--train-data is required"},
        {"--train-data " + dir.path + "/badmagic.bin", "badmagic.bin: not a token shard"},
        {"--train-data " + dir.path + "/good.bin --seq-len 1000", "exceeds the model's max_seq_len"},
        {"--train-data " + dir.path + "/good.bin --batch-size 0", "--batch-size must be positive"},
        {"--train-data " + dir.path + "/good.bin --steps 0", "give a positive --steps or --tokens"},
        {"--train-data " + dir.path + "/good.bin --preset nope", "unknown preset 'nope'"},
        {"--train-data " + dir.path + "/good.bin --optimizer lion", "unknown --optimizer 'lion'"},
        {"--train-data " + dir.path + "/good.bin --optimizer shampoo --shampoo-grafting adamw",
         "--shampoo-grafting: must be one of adam, rmsprop, adagrad, sgd, none"},
        {"--train-data " + dir.path + "/good.bin --optimizer shampoo --shampoo-weight-decay-type coupled",
         "--shampoo-weight-decay-type: must be one of l2, decoupled, corrected, independent"},
        {"--train-data " + dir.path + "/good.bin --optimizer shampoo --shampoo-eigen-method jacobi",
         "--shampoo-eigen-method: must be one of eigh, qr"},
        {"--train-data " + dir.path + "/good.bin --optimizer shampoo --shampoo-dampening 1", "--shampoo-dampening must be in [0, 1)"},
        {"--train-data " + dir.path + "/good.bin --out-dir " + dir.path + "/blocker/sub", "is not a directory"},
        {"--train-data " + dir.path + "/good.bin --resume " + dir.path + "/nockpt", "no such checkpoint directory"},
        {"--train-data " + dir.path + "/good.bin --steps abc", "Could not convert: --steps"},
        {"--train-data " + dir.path + "/good.bin --no-such-flag", "The following argument was not expected"},
    };
    for (const auto& c : cases) {
        CAPTURE(c.args);
        std::string output;
        const int rc = run_command(base + " " + c.args, output);
        CAPTURE(output);
        CHECK(rc != 0);
        CHECK(output.find(c.message) != std::string::npos);
        CHECK(std::count(output.begin(), output.end(), '\n') <= 2);
    }
    CHECK(list_checkpoints(dir.path + "/out").empty());
    std::string output;
    CHECK(run_command(train + " --help", output) == 0);
    CHECK(output.find("--grad-accum") != std::string::npos);
    CHECK(run_command(train + " --list-presets", output) == 0);
    CHECK(output.find("124,475,904") != std::string::npos);
}

TEST_CASE("the train binary: SIGTERM finishes the step, checkpoints and exits cleanly") {
    const std::string train = bin("train");
    if (!file_exists(train)) {
        MESSAGE("skipped: " << train << " not built (run through `make test`)");
        return;
    }
    TempDir dir;
    write_shard(dir / "good.bin", synthetic_tokens(50000, 64, 1));
    const std::string out = dir / "out";
    const std::string command = "exec " + train + " --preset olmo2-tiny --vocab-size 64 --steps 100000 -b 2 -t 16 --val-data '' --threads 1 --train-data " +
                                dir.path + "/good.bin --out-dir " + out + " > " + dir.path + "/log.txt 2>&1";
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        ::execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
        ::_exit(127);
    }
    // Wait until a few steps have been logged, then ask it to stop.
    for (int i = 0; i < 300; ++i) {
        if (file_exists(out + "/metrics.jsonl") && file_size(out + "/metrics.jsonl") > 500) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
    const std::string log = read_file(dir / "log.txt");
    INFO(log);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    CHECK(log.find("stop requested") != std::string::npos);
    const auto checkpoints = list_checkpoints(out);
    REQUIRE(checkpoints.size() == 1);
    CHECK(read_checkpoint(checkpoints[0]).state.step > 0);
}

TEST_CASE("the bench binary: a bad --config gives one clear line and a non-zero exit, with or without a GPU") {
    const std::string bench = bin("bench");
    if (!file_exists(bench)) {
        MESSAGE("skipped: " << bench << " not built (run through `make test`)");
        return;
    }
    struct Case {
        std::string config, message;
    };
    const std::vector<Case> cases = {
        {"gpt2-124m:32", "expected PRESET:BATCH:SEQ_LEN"},
        {"gpt2-124m:x:1024", "batch and sequence length must be integers"},
        {"gpt2-124m:0:1024", "batch and sequence length must be positive"},
        {"nope:32:1024", "unknown preset 'nope'"},
        {"gpt2-124m:32:4096", "sequence length above the preset's 1024"},
    };
    for (const auto& c : cases) {
        CAPTURE(c.config);
        std::string output;
        const int rc = run_command(bench + " --config " + c.config, output);
        CAPTURE(output);
        CHECK(rc == 1);
        CHECK(output.find(c.message) != std::string::npos);
        CHECK(std::count(output.begin(), output.end(), '\n') <= 2);
    }
}
