// The `train` binary's flags (CLI11), kept apart from main so tests can parse argument lists.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>

#include "train/trainer.hpp"

namespace qopt {

// Default data: the Brown corpus shards that `make setup` writes.
constexpr const char* kDefaultTrainData = "build/data/brown/brown_train_*.bin";
constexpr const char* kDefaultValData = "build/data/brown/brown_val_*.bin";

void add_train_flags(CLI::App& app, TrainOptions& options);
// Parses argv into app, then runs body. CLI errors (and --help) exit as CLI11 says; a
// qopt::Error prints "<program>: error: <what>" and exits 1; any other exception prints
// "<program>: internal error: <what>" and exits 2.
int run_main(CLI::App& app, int argc, char** argv, const char* program, const std::function<int()>& body);

// --device cpu|cuda|auto and --threads, as the evaluation binaries take them.
void add_device_flags(CLI::App& app, std::string& device, int& threads);

// A table of the presets with exact parameter counts.
std::string presets_table();

}  // namespace qopt
