// A tiny olmo2 training run on a learnable synthetic stream of 64 token ids (shards written
// into `dir` on first use), shared by the training and optimizer tests.
#pragma once
#include <algorithm>
#include <sstream>
#include <string>

#include "helpers.hpp"
#include "kernels/device.hpp"
#include "kernels/gpu.hpp"
#include "train/checkpoint.hpp"
#include "train/trainer.hpp"

namespace qopt::test {

// The CPU always; the CUDA path too where a GPU is present (said once where it is not).
// QOPT_TEST_DEVICES=cuda runs only the GPU variants (on the GPU machine, whose time is short).
inline std::vector<std::string> devices() {
    const std::string only = env_or("QOPT_TEST_DEVICES", "");
    if (only == "cuda" && gpu_available()) return {"cuda"};
    if (gpu_available()) return {"cpu", "cuda"};
    MESSAGE("the --device cuda variant is skipped: " << query_cuda_device().problem);
    return {"cpu"};
}

inline TrainOptions tiny_run(const TempDir& dir, long steps) {
    if (!file_exists(dir / "train.bin")) {
        write_shard(dir / "train.bin", synthetic_tokens(20000, 64, 11));
        write_shard(dir / "val.bin", synthetic_tokens(3000, 64, 12));
    }
    TrainOptions o;
    o.preset = "olmo2-tiny";
    o.vocab_size = 64;
    o.max_seq_len = 32;
    o.train_data = dir / "train.bin";
    o.val_data = dir / "val.bin";
    o.batch_size = 4;
    o.seq_len = 32;
    o.steps = steps;
    o.optim.lr = 1e-2;
    o.warmup_steps = std::min(5L, steps);
    o.val_batches = 4;
    o.out_dir = dir / "run";
    o.keep_checkpoints = 0;
    return o;
}

// The same run, 40 steps, with optimizer `name` at its reference defaults (tiny_run's lr is
// AdamW's for this model), on `device`, in its own folder.
inline TrainOptions tiny_optimizer_run(const TempDir& dir, const std::string& name, const std::string& device) {
    TrainOptions o = tiny_run(dir, 40);
    o.optim.lr = 0;
    o.device = device;
    o.optimizer = name;
    o.keep_checkpoints = 3;
    o.out_dir = dir / ("run_" + name);
    return o;
}

// Runs `full` (with a checkpoint at `resume_step`), then the same run resumed from that
// checkpoint in another folder, and checks that the resumed steps, the final validation loss,
// weights, optimizer state and RNG equal the uninterrupted run's bit for bit.
inline void check_exact_resume(TrainOptions full, long resume_step, const std::string& label, std::ostream& log) {
    full.checkpoint_every = resume_step;
    full.out_dir = full.out_dir + "_full_" + label;
    const TrainResult a = run_training(full, log);
    TrainOptions resumed = full;
    resumed.out_dir = full.out_dir + "_resumed";
    resumed.resume = full.out_dir + "/checkpoints/" + checkpoint_name(resume_step);
    const TrainResult b = run_training(resumed, log);
    const size_t rest = a.train_losses.size() - size_t(resume_step);
    REQUIRE(b.train_losses.size() == rest);
    for (size_t i = 0; i < rest; ++i) CHECK(b.train_losses[i] == a.train_losses[size_t(resume_step) + i]);  // exact
    CHECK(b.val_loss_end == a.val_loss_end);
    const Checkpoint end_a = read_checkpoint(a.last_checkpoint), end_b = read_checkpoint(b.last_checkpoint);
    CHECK(end_a.params == end_b.params);
    REQUIRE(end_a.optimizer.tensors.size() == end_b.optimizer.tensors.size());
    for (size_t i = 0; i < end_a.optimizer.tensors.size(); ++i)
        CHECK(end_a.optimizer.tensors[i].values == end_b.optimizer.tensors[i].values);
    CHECK(end_a.optimizer.extra.dump() == end_b.optimizer.extra.dump());
    CHECK(end_a.state.rng_state == end_b.state.rng_state);
    CHECK(end_a.state.train_position.token_offset == end_b.state.train_position.token_offset);
}

// The training losses a run's metrics.jsonl records, in step order.
inline std::vector<double> metrics_train_losses(const std::string& metrics_path) {
    std::vector<double> losses;
    std::istringstream lines(read_file(metrics_path));
    for (std::string line; std::getline(lines, line);) {
        const Json record = Json::parse(line);
        if (record.at("type").as_string() == "train") losses.push_back(record.at("loss").as_double());
    }
    return losses;
}

// Trains tiny_run for `steps` on the CPU and returns the final checkpoint's directory.
inline std::string trained_tiny_checkpoint(const TempDir& dir, long steps, TrainOptions* options = nullptr) {
    TrainOptions o = tiny_run(dir, steps);
    o.device = "cpu";
    std::ostringstream log;
    run_training(o, log);
    if (options) *options = o;
    return list_checkpoints(o.out_dir).front();
}

}  // namespace qopt::test
