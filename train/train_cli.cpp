#include "train/train_cli.hpp"

#include <iostream>

#include "core/error.hpp"

#include <cstdio>

#include "model/params.hpp"
#include "optim/optimizer_cli.hpp"
#include "quant/quant_cli.hpp"

namespace qopt {

void add_train_flags(CLI::App& app, TrainOptions& o) {
    o.train_data = kDefaultTrainData;
    o.val_data = kDefaultValData;
    app.option_defaults()->always_capture_default()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);

    app.add_option("--preset", o.preset, "Model preset (see --list-presets)")->group("Model");
    app.add_option("--n-layers", o.n_layers, "transformer blocks (0: the preset's value)")->group("Model");
    app.add_option("--d-model", o.d_model, "residual width (0: the preset's value)")->group("Model");
    app.add_option("--n-heads", o.n_heads, "attention heads (must divide d_model) (0: the preset's value)")->group("Model");
    app.add_option("--d-ff", o.d_ff, "MLP hidden width (0: the preset's value)")->group("Model");
    app.add_option("--max-seq-len", o.max_seq_len, "longest sequence (positions / RoPE table) (0: the preset's value)")->group("Model");
    app.add_option("--vocab-size", o.vocab_size, "vocabulary size (token ids must be below it) (0: the preset's value)")
        ->group("Model");
    app.add_option("--padded-vocab-size", o.padded_vocab_size,
                   "embedding rows (default: vocab size rounded up to 128) (0: the preset's value)")
        ->group("Model");
    app.add_option("--rope-theta", o.rope_theta, "RoPE base (olmo2) (0: the preset's value)")->group("Model");
    app.add_option("--norm-eps", o.norm_eps, "RMSNorm/LayerNorm epsilon (0: the preset's value)")->group("Model");

    app.add_option("--device", o.device, "cpu, cuda or auto (auto: the GPU when a usable one is present, else the CPU)")
        ->group("Device");
    app.add_option("--threads", o.threads, "OpenMP threads for the CPU path (0: all cores)")->group("Device");
    app.add_option("--cpu-ranks", o.cpu_ranks,
                   "Data-parallel ranks on the CPU, as threads (ZeRO-1 optimizer shares, rows of the batch each): the "
                   "multi-GPU path's algorithm, checked against one process; not faster. GPU ranks are processes: "
                   "--nproc, mpirun or srun")
        ->group("Device");
    app.add_option("--collectives", o.collectives,
                   "How GPU ranks exchange gradients and parameters: nccl (GPU to GPU), host (through host memory; "
                   "ranks sharing a GPU), auto (nccl when every rank has its own GPU and NCCL loads, else host)")
        ->check(CLI::IsMember({"auto", "nccl", "host"}))
        ->group("Data parallelism");
    app.add_option("--overlap-reduction", o.overlap_reduction,
                   "With NCCL: average each block's gradients while the backward pass computes the blocks below "
                   "(false: the whole gradient buffer after the backward pass)")
        ->group("Data parallelism");
    app.add_flag("--recompute", o.recompute,
                 "GPU: recompute each block's MLP activation in the backward pass instead of keeping it "
                 "(saves layers x B x T x d_ff bf16)")
        ->group("Device");

    add_quant_flags(app, o.qat, "qat", QuantStyle::Quest);
    add_optimizer_flags(app, o.optimizer, o.optim);
    app.add_option("--schedule", o.schedule, "Learning-rate schedule: cosine, linear, wsd or constant")
        ->group("Optimizer");
    app.add_option("--warmup-steps", o.warmup_steps, "Linear warmup steps")->group("Optimizer");
    app.add_option("--lr-final-fraction", o.lr_final_fraction, "Final learning rate as a fraction of --lr")
        ->group("Optimizer");
    app.add_option("--wsd-decay-fraction", o.wsd_decay_fraction, "wsd: fraction of the steps spent decaying")
        ->group("Optimizer");
    app.add_option("--grad-clip", o.grad_clip, "Clip the global gradient norm to this (0: off)")->group("Optimizer");
    app.add_option("--nan-policy", o.nan_policy,
                   "Non-finite loss or gradient: skip (skip the update, warn, count) or stop (checkpoint and exit)")
        ->group("Optimizer");
    app.add_option("--loss-spike-factor", o.loss_spike_factor,
                   "Log a loss spike when a step's loss exceeds this multiple of the recent average (0: off)")
        ->group("Optimizer");

    app.add_option("--train-data", o.train_data, "Training shards (glob pattern, llm.c .bin format)")->group("Data");
    app.add_option("--val-data", o.val_data, "Validation shards (glob pattern; empty: no validation)")->group("Data");
    app.add_option("--batch-size,-b", o.batch_size, "Sequences per micro-batch")->group("Data");
    app.add_option("--seq-len,-t", o.seq_len, "Tokens per sequence")->group("Data");
    app.add_option("--grad-accum", o.grad_accum, "Micro-batches per optimizer step")->group("Data");
    app.add_option("--steps", o.steps, "Optimizer steps to run (or use --tokens)")->group("Data");
    app.add_option("--tokens", o.tokens, "Token budget; steps = ceil(tokens / tokens per step)")->group("Data");
    app.add_option("--seed", o.seed, "Seed for the initial weights")->group("Data");

    app.add_option("--eval-every", o.eval_every, "Validation every N steps (0: only at start and end)")
        ->group("Output");
    app.add_option("--val-batches", o.val_batches, "Validation batches per evaluation (0: whole set)")
        ->group("Output");
    app.add_option("--target-loss", o.target_loss,
                   "Stop at the first validation loss at or below this (0: off; the schedule stays the full "
                   "budget's: the common-loss protocol; needs --eval-every)")
        ->group("Output");
    app.add_option("--out-dir", o.out_dir, "Run directory: metrics.jsonl and checkpoints/")->group("Output");
    app.add_option("--checkpoint-every", o.checkpoint_every, "Checkpoint every N steps (0: only at the end)")
        ->group("Output");
    app.add_option("--keep-checkpoints", o.keep_checkpoints, "Keep the newest K checkpoints (0: all)")
        ->group("Output");
    app.add_option("--resume", o.resume,
                   "Resume: a checkpoint directory, or 'auto' for the newest valid one in --out-dir")
        ->group("Output");
    app.add_option("--log-every", o.log_every, "Print a step line every N steps")->group("Output");
}

std::string presets_table() {
    std::string out = "preset        arch   layers d_model heads  d_ff  max_T      parameters  description\n";
    for (const auto& p : presets()) {
        const ParamLayout layout = ParamLayout::build(p.config);
        char line[256];
        std::snprintf(line, sizeof line, "%-13s %-6s %6d %7d %5d %5d %6d %15s  %s\n", p.name.c_str(),
                      arch_name(p.config.arch), p.config.n_layers, p.config.d_model, p.config.n_heads, p.config.d_ff,
                      p.config.max_seq_len, with_commas(layout.total).c_str(), p.description.c_str());
        out += line;
    }
    return out;
}

int run_main(CLI::App& app, int argc, char** argv, const char* program, const std::function<int()>& body) {
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e);
    }
    try {
        return body();
    } catch (const Error& e) {
        std::cerr << program << ": error: " << e.what() << "\n";
        return 1;
    } catch (const std::exception& e) {
        std::cerr << program << ": internal error: " << e.what() << "\n";
        return 2;
    }
}

void add_device_flags(CLI::App& app, std::string& device, int& threads) {
    app.add_option("--device", device, "cpu, cuda or auto (auto: the GPU when a usable one is present)")
        ->group("Device");
    app.add_option("--threads", threads, "OpenMP threads for CPU work (0: all cores)")->group("Device");
}

}  // namespace qopt
