// init_model: writes a checkpoint (step 0) of a freshly initialised model, exactly the weights
// `train --seed S` starts from, so other tools (PyTorch, the oracle in tools/torch_oracle.py)
// can load them: <out-dir>/checkpoints/step_00000000/model.safetensors.
#include <iostream>

#include <CLI/CLI.hpp>

#include "core/error.hpp"
#include "train/train_cli.hpp"
#include "core/files.hpp"
#include "optim/optimizer.hpp"
#include "train/checkpoint.hpp"
#include "train/trainer.hpp"

int main(int argc, char** argv) {
    CLI::App app{"qopt init_model: write the initial weights of a model (preset + overrides + seed) as a checkpoint"};
    qopt::TrainOptions o;
    app.add_option("--preset", o.preset, "Model preset (see train --list-presets)")->capture_default_str();
    app.add_option("--n-layers", o.n_layers, "transformer blocks (0: the preset's value)");
    app.add_option("--d-model", o.d_model, "residual width (0: the preset's value)");
    app.add_option("--n-heads", o.n_heads, "attention heads (0: the preset's value)");
    app.add_option("--d-ff", o.d_ff, "MLP hidden width (0: the preset's value)");
    app.add_option("--max-seq-len", o.max_seq_len, "longest sequence (0: the preset's value)");
    app.add_option("--vocab-size", o.vocab_size, "vocabulary size (0: the preset's value)");
    app.add_option("--seed", o.seed, "initialisation seed (as train --seed)")->capture_default_str();
    app.add_option("--out-dir", o.out_dir, "where checkpoints/step_00000000 is written")->required();
    return qopt::run_main(app, argc, argv, "init_model", [&] {
        qopt::Checkpoint checkpoint;
        checkpoint.config = qopt::resolve_model_config(o);
        const qopt::ParamLayout layout = qopt::ParamLayout::build(checkpoint.config);
        checkpoint.params.resize(layout.total);
        qopt::init_params(layout, o.seed, checkpoint.params.data());
        // A fresh AdamW state, so `train --resume` can continue from it.
        checkpoint.optimizer = qopt::make_cpu_optimizer(layout, qopt::OptimizerConfig{})->state();
        checkpoint.run = qopt::Json::object();
        checkpoint.run["preset"] = o.preset;
        checkpoint.run["seed"] = o.seed;
        qopt::check_writable_directory(o.out_dir);
        std::cout << qopt::write_checkpoint(o.out_dir, checkpoint) << "\n";
        return 0;
    });
}
