// Training checkpoints. One directory per step, <out_dir>/checkpoints/step_<8 digits>/:
//   model.safetensors      fp32 weights under their layout names (loads in any safetensors
//                          tool); metadata "qopt_config" holds the model config as JSON
//   optimizer.safetensors  the optimizer's state tensors under their names (AdamW moments as
//                          "<name>.exp_avg" / "<name>.exp_avg_sq"; see optim/optimizer_state.hpp);
//                          metadata "qopt_optimizer" names the optimizer
//   state.json             step, data position, RNG state, optimizer name, step and scalars,
//                          schedule, run settings, and a checksum of each .safetensors file
// The directory is assembled under a temporary name and renamed into place, so a crash
// leaves either the previous checkpoint set or the new complete one; loading verifies the
// checksums and refuses a damaged checkpoint with a message.
#pragma once
#include <array>
#include <map>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "core/json.hpp"
#include "data/loader.hpp"
#include "model/config.hpp"
#include "model/params.hpp"
#include "optim/optimizer_state.hpp"

namespace qopt {

struct TrainState {
    long step = 0;  // optimizer steps completed
    uint64_t tokens_seen = 0;
    long skipped_steps = 0;  // steps whose update was skipped (non-finite loss or gradients)
    long loss_spikes = 0;    // steps logged as loss spikes
    double loss_average = 0;  // the spike check's running average (an EMA of finite losses) ...
    long loss_average_count = 0;  // ... over this many steps
    LoaderPosition train_position;
    std::array<uint64_t, 4> rng_state{};
};

struct Checkpoint {
    ModelConfig config;
    TrainState state;
    Json run;  // optimizer, schedule and batch settings the run was started with
    std::vector<float> params;
    OptimizerState optimizer;
};

std::string checkpoint_name(long step);  // "step_00000100"
std::string checkpoints_root(const std::string& out_dir);

// Writes <out_dir>/checkpoints/step_N atomically (replacing one of the same step).
std::string write_checkpoint(const std::string& out_dir, const Checkpoint& checkpoint);

// Reads and verifies one checkpoint directory; throws qopt::Error naming what is wrong.
// Without the optimizer state (evaluation, PTQ) its file is neither read nor verified.
Checkpoint read_checkpoint(const std::string& directory, bool with_optimizer_state = true);

// state.json's contents: the checkpoint without its tensors (config, counters, run settings),
// and the expected checksum of each .safetensors file. Throws naming `state_path`.
Checkpoint parse_checkpoint_state(const std::string& text, const std::string& state_path,
                                  std::map<std::string, std::string>* checksums = nullptr);

// Checkpoint directories under out_dir, newest first (by step number).
std::vector<std::string> list_checkpoints(const std::string& out_dir);

// The newest checkpoint that reads and verifies; damaged ones are reported to `log` and
// skipped. Empty when there is none.
std::string latest_valid_checkpoint(const std::string& out_dir, std::ostream& log);

// Removes all but the newest `keep` checkpoints (keep <= 0 keeps all).
void prune_checkpoints(const std::string& out_dir, int keep);

// Tidies what a writer killed mid-write (SIGKILL, power loss) left in <out_dir>/checkpoints:
// a half-built "step_N.tmp.<pid>" is removed; a "step_N.old.<pid>" (the previous checkpoint of
// a step being replaced) is renamed back when step_N itself is missing, else removed. Entries
// of a process that is still running are left alone. Returns one line per action, for the log.
std::vector<std::string> recover_interrupted_writes(const std::string& out_dir);

}  // namespace qopt
