// train: trains a model (olmo2 or gpt2 layout) on llm.c-format token shards.
#include <iostream>

#include "core/error.hpp"
#include "train/train_cli.hpp"

int main(int argc, char** argv) {
    // First of all: a SIGTERM during start-up then stops the run after its first step (with a
    // checkpoint) instead of killing it.
    qopt::install_stop_handlers();
    CLI::App app{"qopt train: train an OLMo2-style or GPT-2 model on token shards, with checkpoints and exact resume"};
    qopt::TrainOptions options;
    qopt::add_train_flags(app, options);
    bool list_presets = false;
    app.add_flag("--list-presets", list_presets, "Print the model presets with exact parameter counts and exit");
    return qopt::run_main(app, argc, argv, "train", [&] {
        if (list_presets) {
            std::cout << qopt::presets_table();
            return 0;
        }
        qopt::TrainResult result = qopt::run_training(options, std::cout);
        if (result.interrupted) std::cout << "interrupted; resume with --resume auto --out-dir " << options.out_dir << "\n";
        return 0;
    });
}
