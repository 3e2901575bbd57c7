// The optimizer flags, shared by every binary that builds an optimizer (train, bench,
// optim_replay): --optimizer and each method's hyperparameters with the reference's defaults.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

#include "optim/optimizer.hpp"

namespace qopt {

// `name` receives --optimizer; call resolve_optimizer(name, config) (optim/optimizer.hpp) after parsing.
void add_optimizer_flags(CLI::App& app, std::string& name, OptimizerConfig& config);

}  // namespace qopt
