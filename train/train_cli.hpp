// The `train` binary's flags (CLI11), kept apart from main so tests can parse argument lists.
#pragma once
#include <CLI/CLI.hpp>

#include "train/trainer.hpp"

namespace qopt {

// Default data: the Brown corpus shards that `make setup` writes.
constexpr const char* kDefaultTrainData = "build/data/brown/brown_train_*.bin";
constexpr const char* kDefaultValData = "build/data/brown/brown_val_*.bin";

void add_train_flags(CLI::App& app, TrainOptions& options);
// A table of the presets with exact parameter counts.
std::string presets_table();

}  // namespace qopt
