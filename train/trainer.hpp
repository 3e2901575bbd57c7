// The training loop behind the `train` binary, callable in-process (tests use it).
#pragma once
#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "optim/optimizer.hpp"
#include "quant/linear_quant.hpp"

namespace qopt {

struct TrainOptions {
    // Model: a preset, with any shape field overridden (0 keeps the preset's value).
    std::string preset = "olmo2-mini";
    int n_layers = 0, d_model = 0, n_heads = 0, d_ff = 0, max_seq_len = 0, vocab_size = 0, padded_vocab_size = 0;
    double rope_theta = 0, norm_eps = 0;

    std::string device = "auto";  // cpu | cuda | auto
    int threads = 0;              // OpenMP threads for the CPU path (0: OpenMP's default)
    // > 1: a data-parallel run on the CPU, this many ranks as threads of this process (see
    // run_training): the multi-GPU path's algorithm, checked against one process; not faster.
    int cpu_ranks = 1;
    // GPU ranks (one process each): how they exchange gradients and parameter shares. "nccl":
    // NCCL between their GPUs; "host": copies through host memory over the ranks' own connection
    // (slow; what ranks sharing one GPU can do); "auto": NCCL when every rank has a GPU of its own
    // and NCCL loads, else host.
    std::string collectives = "auto";
    // With NCCL: each block's gradients are averaged while the backward pass computes the blocks
    // below (false: the whole buffer after the backward pass).
    bool overlap_reduction = true;
    // This rank's place among the ranks on its machine (set by the launcher, not a flag; -1: the
    // rank itself): its GPU is local_rank modulo the GPUs it sees.
    int local_rank = -1;
    bool recompute = false;       // GPU: recompute MLP activations in the backward pass
    QuantOptions qat;             // --qat w4a4 and its flags (QuEST defaults); format "off": full precision

    // Optimization
    std::string optimizer = "adamw";  // --optimizer; resolve_optimizer_config() turns it into optim.kind
    OptimizerConfig optim;              // every method's settings; optim.lr 0: the method's default
    std::string schedule = "cosine";
    long warmup_steps = 0;
    double lr_final_fraction = 0.1;
    double wsd_decay_fraction = 0.2;
    double grad_clip = 1.0;  // 0 disables clipping
    std::string nan_policy = "skip";  // skip | stop
    // A step whose loss exceeds this multiple of the recent average (an EMA over ~10 finite
    // steps, from step 10 on) is logged as a loss spike; 0 turns the check off.
    double loss_spike_factor = 1.5;

    // Data and batch
    std::string train_data, val_data;
    int batch_size = 8, seq_len = 128, grad_accum = 1;
    long steps = 0;       // optimizer steps; or
    uint64_t tokens = 0;  // a token budget (steps = ceil(tokens / tokens per step))
    uint64_t seed = 1337;

    // Evaluation, output, checkpoints
    long eval_every = 0;   // 0: only before the first and after the last step
    // > 0: stop at the first validation (start, every eval_every steps, end) whose loss is at or
    // below it — the paper's common-loss protocol. The schedule stays the full budget's, so the
    // run is the full run cut short.
    double target_loss = 0;
    int val_batches = 20;  // 0: the whole validation set
    std::string out_dir = "runs/default";
    long checkpoint_every = 0;  // 0: only at the end
    int keep_checkpoints = 3;
    std::string resume;  // "" (fresh run), "auto" (newest valid in out_dir, else fresh), or a directory
    long log_every = 1;
};

struct TrainResult {
    std::vector<double> train_losses;  // one per step run in this call
    double val_loss_start = NAN, val_loss_end = NAN;
    long final_step = 0;
    long skipped_steps = 0;
    long loss_spikes = 0;
    long rejected_preconditioners = 0;  // see Optimizer::rejected_preconditioners
    bool interrupted = false;
    bool reached_target = false;  // target_loss > 0 and a validation reached it (training stopped there)
    std::string last_checkpoint;
};

// The model config the options describe (preset + overrides), validated.
ModelConfig resolve_model_config(const TrainOptions& options);
// The optimizer the options describe (--optimizer + its flags), validated.
OptimizerConfig resolve_optimizer_config(const TrainOptions& options);
// Checks every option that needs no file I/O; throws qopt::Error naming the flag.
void validate_options(const TrainOptions& options);
// Runs (or resumes) training, writing progress lines to `log`. Throws qopt::Error on bad
// input (data, checkpoints, output directory) before any step runs.
// With a communicator of W ranks (every rank calls this with the same options), the run is
// data-parallel: --batch-size is the global batch, each rank computes its B/W rows, the
// gradients are averaged over the ranks, and each rank steps its ZeRO-1 share of the optimizer
// (optim/shard_plan.hpp) and shares the result; rank 0 alone logs, writes metrics and
// checkpoints (the optimizer state merged from all ranks, so any rank count resumes it). The
// result is the single-process run's up to the order of the gradient sums. On GPUs each rank is a
// process on a GPU of its own (or sharing one, with host collectives); see TrainOptions::collectives.
class Communicator;
TrainResult run_training(const TrainOptions& options, std::ostream& log, Communicator* comm = nullptr);

// SIGINT/SIGTERM: the run finishes its current step, writes a checkpoint and returns.
void install_stop_handlers();
void request_stop();  // what the handlers do (also for tests)

// "7,123,456"
std::string with_commas(uint64_t value);

}  // namespace qopt
