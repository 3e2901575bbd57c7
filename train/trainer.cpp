#include "train/trainer.hpp"

#include <omp.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <system_error>
#include <thread>

#include "core/error.hpp"
#include "core/files.hpp"
#include "core/rng.hpp"
#include "data/loader.hpp"
#include "kernels/device.hpp"
#include "optim/schedule.hpp"
#include "optim/shard_plan.hpp"
#include "model/gpu_model.hpp"
#include "train/backend.hpp"
#include "train/checkpoint.hpp"
#include "train/communicator.hpp"
#include "train/nccl_communicator.hpp"

namespace qopt {

static std::atomic<int> g_stop_requested{0};

static void on_stop_signal(int) { g_stop_requested.store(1); }

void install_stop_handlers() {
    std::signal(SIGINT, on_stop_signal);
    std::signal(SIGTERM, on_stop_signal);
    // A write past the file-size limit then fails with EFBIG (reported, old checkpoint kept)
    // instead of killing the process.
    std::signal(SIGXFSZ, SIG_IGN);
}

void request_stop() { g_stop_requested.store(1); }

std::string with_commas(uint64_t value) {
    std::string digits = std::to_string(value), out;
    for (size_t i = 0; i < digits.size(); ++i) {
        if (i && (digits.size() - i) % 3 == 0) out += ',';
        out += digits[i];
    }
    return out;
}

ModelConfig resolve_model_config(const TrainOptions& o) {
    ModelConfig c = preset_config(o.preset);
    if (o.n_layers) c.n_layers = o.n_layers;
    if (o.d_model) c.d_model = o.d_model;
    if (o.n_heads) c.n_heads = o.n_heads;
    if (o.d_ff) c.d_ff = o.d_ff;
    if (o.max_seq_len) c.max_seq_len = o.max_seq_len;
    if (o.vocab_size) {
        c.vocab_size = o.vocab_size;
        if (!o.padded_vocab_size) c.padded_vocab_size = (o.vocab_size + 127) / 128 * 128;
    }
    if (o.padded_vocab_size) c.padded_vocab_size = o.padded_vocab_size;
    if (o.rope_theta) c.rope_theta = float(o.rope_theta);
    if (o.norm_eps) c.norm_eps = float(o.norm_eps);
    c.validate();
    return c;
}

OptimizerConfig resolve_optimizer_config(const TrainOptions& o) {
    OptimizerConfig config = o.optim;
    resolve_optimizer(o.optimizer, config);
    return config;
}

void validate_options(const TrainOptions& o) {
    const ModelConfig config = resolve_model_config(o);
    QOPT_CHECK(o.device == "cpu" || o.device == "cuda" || o.device == "auto", "--device must be cpu, cuda or auto, got '",
               o.device, "'");
    resolve_optimizer_config(o);
    resolve_linear_quant(o.qat, QuantStyle::Quest).validate(config.d_model, config.d_ff);
    QOPT_CHECK(o.batch_size > 0, "--batch-size must be positive, got ", o.batch_size);
    QOPT_CHECK(o.seq_len > 0, "--seq-len must be positive, got ", o.seq_len);
    QOPT_CHECK(o.seq_len <= config.max_seq_len, "--seq-len ", o.seq_len, " exceeds the model's max_seq_len ",
               config.max_seq_len, " (set --max-seq-len to raise it)");
    QOPT_CHECK(o.grad_accum > 0, "--grad-accum must be positive, got ", o.grad_accum);
    QOPT_CHECK(o.steps > 0 || o.tokens > 0, "give a positive --steps or --tokens");
    QOPT_CHECK(!(o.steps > 0 && o.tokens > 0), "give --steps or --tokens, not both");
    QOPT_CHECK(o.steps >= 0, "--steps must be positive, got ", o.steps);
    QOPT_CHECK(o.grad_clip >= 0, "--grad-clip must be non-negative, got ", o.grad_clip);
    QOPT_CHECK(o.eval_every >= 0, "--eval-every must be non-negative");
    QOPT_CHECK(o.target_loss >= 0 && std::isfinite(o.target_loss), "--target-loss must be a non-negative number, got ",
               o.target_loss);
    QOPT_CHECK(o.target_loss == 0 || (!o.val_data.empty() && o.eval_every > 0),
               "--target-loss needs --val-data and --eval-every (how often to check the validation loss)");
    QOPT_CHECK(o.val_batches >= 0, "--val-batches must be non-negative");
    QOPT_CHECK(o.checkpoint_every >= 0, "--checkpoint-every must be non-negative");
    QOPT_CHECK(o.log_every > 0, "--log-every must be positive");
    QOPT_CHECK(o.threads >= 0, "--threads must be non-negative");
    QOPT_CHECK(o.cpu_ranks >= 1, "--cpu-ranks must be at least 1, got ", o.cpu_ranks);
    QOPT_CHECK(o.cpu_ranks == 1 || o.device != "cuda", "--cpu-ranks runs its ranks as threads on the CPU; on GPUs "
               "start one process per rank (--nproc N, mpirun or srun)");
    QOPT_CHECK(o.collectives == "auto" || o.collectives == "nccl" || o.collectives == "host",
               "--collectives must be auto, nccl or host, got '", o.collectives, "'");
    QOPT_CHECK(o.loss_spike_factor == 0 || o.loss_spike_factor > 1, "--loss-spike-factor must be above 1 (0: off), got ",
               o.loss_spike_factor);
    QOPT_CHECK(o.nan_policy == "skip" || o.nan_policy == "stop", "--nan-policy must be skip or stop, got '",
               o.nan_policy, "'");
    QOPT_CHECK(!o.train_data.empty(), "--train-data is required");
    QOPT_CHECK(!o.out_dir.empty(), "--out-dir must not be empty");
    parse_schedule(o.schedule);
}

static long total_steps_of(const TrainOptions& o) {
    if (o.steps > 0) return o.steps;
    const uint64_t per_step = uint64_t(o.batch_size) * uint64_t(o.seq_len) * uint64_t(o.grad_accum);
    return long((o.tokens + per_step - 1) / per_step);
}

static std::string format_duration(double seconds) {
    char buf[32];
    const long s = long(seconds + 0.5);
    if (s >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s / 60) % 60);
    else if (s >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
    else std::snprintf(buf, sizeof buf, "%.1fs", seconds);
    return buf;
}

static Json run_settings(const TrainOptions& o, const OptimizerConfig& optimizer, long total_steps) {
    Json run = Json::object();
    run["preset"] = o.preset;
    run["optimizer"] = o.optimizer;
    run["optimizer_settings"] = optimizer.to_json();
    run["batch_size"] = o.batch_size;
    run["seq_len"] = o.seq_len;
    run["grad_accum"] = o.grad_accum;
    run["total_steps"] = int64_t(total_steps);
    run["lr"] = optimizer.method_lr();
    run["schedule"] = o.schedule;
    run["warmup_steps"] = int64_t(o.warmup_steps);
    run["grad_clip"] = o.grad_clip;
    run["seed"] = o.seed;
    run["train_data"] = o.train_data;
    run["qat"] = resolve_linear_quant(o.qat, QuantStyle::Quest).to_json();
    if (o.target_loss > 0) run["target_loss"] = o.target_loss;
    return run;
}

// A resumed run redoes the steps after its checkpoint (a fresh start: all of them): their
// records (and a line cut short by a kill) are dropped from metrics.jsonl, so the file holds
// each step once. Val records at the checkpoint's step go too (the run writes its own "at" record).
static void trim_metrics(const std::string& path, long resumed_step, std::ostream& log) {
    if (!file_exists(path)) return;
    std::istringstream lines(read_file(path));
    std::string line, kept;
    long dropped = 0;
    while (std::getline(lines, line)) {
        bool keep = false;
        try {
            const Json record = Json::parse(line);
            const long step = long(record.at("step").as_int("step"));
            const bool is_train = record.at("type").as_string("type") == "train";
            keep = step < resumed_step || (step == resumed_step && is_train);
        } catch (const Error&) {
            keep = false;  // a line cut short by a kill
        }
        if (keep) kept += line + "\n";
        else ++dropped;
    }
    if (dropped == 0) return;
    write_file_atomic(path, kept);
    log << "metrics: dropped " << dropped << " record(s) past step " << resumed_step << " from " << path
        << " (those steps run again)\n";
}

// --cpu-ranks N: N thread ranks over a LocalGroup; rank 0's result. A rank that fails stops the
// group, and its error (rather than the others' "another rank stopped") is thrown.
static TrainResult run_on_thread_ranks(const TrainOptions& options, std::ostream& log) {
    const int world = options.cpu_ranks;
    LocalGroup group(world);
    std::vector<TrainResult> results(static_cast<size_t>(world));
    std::vector<std::string> errors(static_cast<size_t>(world));
    std::vector<std::thread> threads;
    threads.reserve(size_t(world));  // so that only std::thread's start can throw below
    std::ostringstream quiet;
    try {
        for (int r = 0; r < world; ++r)
            threads.emplace_back([&, r] {
                try {
                    results[size_t(r)] = run_training(options, r == 0 ? log : quiet, &group.rank(r));
                } catch (const std::exception& e) {
                    errors[size_t(r)] = e.what();
                    group.abort(e.what());
                }
            });
    } catch (const std::system_error& e) {
        // The ranks started so far stop at their next exchange; join them rather than end the
        // process with threads unjoined.
        group.abort("a thread rank could not start");
        for (auto& t : threads) t.join();
        fail("--cpu-ranks ", world, ": thread rank ", threads.size(), " could not start (", e.what(), ")");
    }
    for (auto& t : threads) t.join();
    for (const std::string& e : errors)
        if (!e.empty() && e.find("another rank stopped") == std::string::npos) fail(e);
    for (const std::string& e : errors)
        if (!e.empty()) fail(e);
    return results[0];
}

// GPU ranks: each takes its GPU (its local rank modulo the GPUs it sees), and the ranks agree on
// how to exchange: NCCL when every rank can (a GPU of its own, NCCL loads) and --collectives lets
// them, else copies through host memory over `host`. Returns the communicator the run uses: the
// NCCL one (kept in `nccl`) or `host`; for host copies, `line` says why, for the log.
static Communicator* choose_gpu_collectives(const TrainOptions& options, Communicator& host,
                                            std::unique_ptr<Communicator>& nccl, std::string& line) {
    const int gpus = cuda_device_count();
    if (gpus == 0) fail("--device cuda: ", query_cuda_device().problem);
    const int local = options.local_rank >= 0 ? options.local_rank : host.rank();
    use_cuda_device(local % gpus);
    // Over all ranks: how many have no GPU of their own, and how many cannot load NCCL.
    const std::string nccl_problem = nccl_unavailable_reason();
    double counts[2] = {double(local >= gpus), double(!nccl_problem.empty())};
    host.all_reduce_sum(counts, 2);
    std::string why_not;
    if (options.collectives == "host")
        why_not = "--collectives host";
    else if (counts[0] > 0)
        why_not = "ranks share GPUs: " + std::to_string(int(counts[0])) + " of the " +
                  std::to_string(host.world_size()) + " ranks have no GPU of their own";
    else if (counts[1] > 0)
        why_not = nccl_problem.empty() ? "NCCL cannot be used on another rank" : nccl_problem;
    if (options.collectives == "nccl" && !why_not.empty()) fail("--collectives nccl: ", why_not);
    if (why_not.empty()) {
        nccl = make_nccl_communicator(host);  // its describe() says so in the run log
        return nccl.get();
    }
    line = "collectives: GPU buffers copied through host memory (" + why_not + ")";
    return &host;
}

TrainResult run_training(const TrainOptions& options, std::ostream& root_log, Communicator* comm) {
    validate_options(options);
    if (!comm && options.cpu_ranks > 1) return run_on_thread_ranks(options, root_log);
    QOPT_CHECK(!comm || comm->world_size() == options.cpu_ranks || options.cpu_ranks == 1,
               "--cpu-ranks ", options.cpu_ranks, " but a communicator of ", comm ? comm->world_size() : 0, " ranks");
    const ModelConfig config = resolve_model_config(options);
    // Data parallelism: this rank's place; only rank 0 logs, writes metrics and checkpoints.
    const int world = comm ? comm->world_size() : 1, rank = comm ? comm->rank() : 0;
    const bool root = rank == 0;
    std::ostream silent(nullptr);
    std::ostream& log = root ? root_log : silent;

    // Device: "auto" takes a usable GPU when there is one.
    const OptimizerConfig optimizer = resolve_optimizer_config(options);
    const CudaDeviceInfo gpu = query_cuda_device();
    std::string gpu_problem = GpuModel::unsupported_reason(config);
    // Thread ranks (--cpu-ranks) share this process and stay on the CPU.
    const bool thread_ranks = options.cpu_ranks > 1;
    const bool use_cuda = !thread_ranks && (options.device == "cuda" ||
                                            (options.device == "auto" && gpu.usable && gpu_problem.empty()));
    if (options.device == "auto" && gpu.usable && !gpu_problem.empty())
        log << "device: the CPU, since the GPU cannot run this: " << gpu_problem << "\n";
    std::unique_ptr<Communicator> nccl_comm;  // the GPU ranks' NCCL communicator, over `comm`
    std::string collectives_line;
    if (comm && !thread_ranks) {
        double cuda_ranks = use_cuda;
        comm->all_reduce_sum(&cuda_ranks, 1);
        QOPT_CHECK(cuda_ranks == 0 || cuda_ranks == world, int(cuda_ranks), " of the ", world,
                   " ranks found a usable GPU and the others did not; give --device cuda or cpu");
        if (use_cuda) comm = choose_gpu_collectives(options, *comm, nccl_comm, collectives_line);
    }
    if (options.threads > 0) omp_set_num_threads(options.threads);

    const long total_steps = total_steps_of(options);
    LrSchedule schedule;
    schedule.kind = parse_schedule(options.schedule);
    schedule.max_lr = optimizer.method_lr();
    schedule.warmup_steps = options.warmup_steps;
    schedule.total_steps = total_steps;
    schedule.final_fraction = options.lr_final_fraction;
    schedule.decay_fraction = options.wsd_decay_fraction;
    schedule.validate();

    // Everything that can fail on bad input is checked before the first step.
    check_writable_directory(options.out_dir);
    if (root)
        for (const std::string& action : recover_interrupted_writes(options.out_dir)) log << "checkpoints: " << action << "\n";
    if (comm) comm->barrier();
    const RankSlice slice{rank, world};
    const int rank_rows = options.batch_size / world;  // the loaders check that it divides
    TokenLoader train_loader(options.train_data, config.vocab_size, options.batch_size, options.seq_len,
                             "--train-data", slice);
    std::unique_ptr<TokenLoader> val_loader;
    if (!options.val_data.empty())
        val_loader = std::make_unique<TokenLoader>(options.val_data, config.vocab_size, options.batch_size,
                                                   options.seq_len, "--val-data", slice);

    const ParamLayout layout = ParamLayout::build(config);
    const Routing routing = route_parameters(layout, optimizer);
    const ShardPlan shards = plan_shards(routing, optimizer, world);
    const OwnedSlots owned = shards.owned_by(rank);
    std::vector<std::vector<ParamRange>> ranges_by_rank;
    for (int r = 0; r < world; ++r) ranges_by_rank.push_back(shards.ranges_of(routing, r));
    const OwnedSlots* share = world > 1 ? &owned : nullptr;
    std::unique_ptr<TrainBackend> backend = use_cuda ? make_cuda_backend(config, optimizer, options.recompute, share)
                                                     : make_cpu_backend(config, optimizer, share);
    const LinearQuantConfig qat = resolve_linear_quant(options.qat, QuantStyle::Quest);
    backend->set_linear_quant(qat);
    TrainState state;
    Rng rng(options.seed ^ 0x5DEECE66Dull);
    std::string resume_from = options.resume;
    if (resume_from == "auto") {
        resume_from = latest_valid_checkpoint(options.out_dir, log);
        if (resume_from.empty()) log << "resume: no checkpoint in " << options.out_dir << ", starting fresh\n";
    }
    if (!resume_from.empty()) {
        Checkpoint ckpt = read_checkpoint(resume_from);
        const std::string diff = config.difference(ckpt.config);
        if (!diff.empty()) fail(resume_from, ": checkpoint was written for a different model (", diff, ")");
        QOPT_CHECK(ckpt.state.step <= total_steps, resume_from, ": checkpoint is at step ", ckpt.state.step,
                   ", past this run's ", total_steps, " steps");
        // A QAT run resumes only as the same QAT run (older checkpoints have no "qat": full precision).
        const std::string saved_qat =
            ckpt.run.is_object() && ckpt.run.contains("qat") ? LinearQuantConfig::from_json(ckpt.run.at("qat")).describe()
                                                             : std::string("off");
        if (saved_qat != qat.describe())
            fail(resume_from, ": checkpoint was trained with --qat ", saved_qat, ", not ", qat.describe());
        backend->set_params(ckpt.params);
        if (ckpt.optimizer.optimizer != optimizer_name(optimizer.kind))
            fail(resume_from, ": checkpoint was written by --optimizer ", ckpt.optimizer.optimizer, ", not ",
                 optimizer_name(optimizer.kind));
        backend->set_optimizer_state(ckpt.optimizer);
        state = ckpt.state;
        train_loader.set_position(state.train_position);
        rng.set_state(state.rng_state);
        log << "resumed from " << resume_from << " at step " << state.step << "\n";
    } else {
        std::vector<float> params(layout.total);
        init_params(layout, options.seed, params.data());
        backend->set_params(params);
    }

    // A fresh start drops every record (those of a killed earlier start of this run), a resume
    // those past its checkpoint.
    if (root) trim_metrics(options.out_dir + "/metrics.jsonl", state.step, log);

    // Summary of what will run.
    uint64_t embedding_params = 0;
    for (const auto& t : layout.tensors)
        if (t.kind == ParamKind::Embedding || t.kind == ParamKind::Position) embedding_params += t.numel;
    log << "model: " << options.preset << " (" << arch_name(config.arch) << ") " << config.n_layers << " layers x "
        << config.d_model << ", " << config.n_heads << " heads, d_ff " << config.d_ff << ", vocab "
        << config.vocab_size << " (padded " << config.padded_vocab_size << ")\n";
    log << "parameters: " << with_commas(layout.total) << " (embedding " << with_commas(embedding_params)
        << ", non-embedding " << with_commas(layout.total - embedding_params) << ")\n";
    log << "device: " << backend->describe() << "\n";
    const std::string memory = backend->memory_report(options.batch_size, options.seq_len);
    if (!memory.empty()) log << "memory: " << memory << "\n";
    const uint64_t tokens_per_step = uint64_t(options.batch_size) * options.seq_len * options.grad_accum;
    log << "data: " << train_loader.paths().size() << " train shard(s), " << with_commas(train_loader.total_tokens())
        << " tokens; " << with_commas(tokens_per_step) << " tokens per step (" << options.batch_size << " x "
        << options.seq_len << " x " << options.grad_accum << " accumulation)\n";
    // AdamW's settings only where some tensor is AdamW's (Scion routes none to it).
    log << "optimizer: " << optimizer_name(optimizer.kind) << " lr " << optimizer.method_lr();
    if (optimizer.kind != OptimizerKind::AdamW && !routing.adamw.empty())
        log << ", AdamW lr " << optimizer.aux_adamw_lr();
    log << " (" << options.schedule << ", warmup " << options.warmup_steps << ")";
    if (!routing.adamw.empty()) log << ", AdamW betas " << optimizer.adamw.beta1 << "/" << optimizer.adamw.beta2;
    log << ", weight decay " << optimizer.weight_decay() << " on 2-D tensors, clip " << options.grad_clip << "; "
        << total_steps << " steps\n";
    log << "optimizer routing: " << routing.describe() << "\n";
    if (qat.enabled()) log << "quantization-aware training: " << qat.describe() << "\n";
    log << "optimizer state: " << with_commas(backend->optimizer_state_bytes() / (1 << 20)) << " MiB"
        << (world > 1 ? " on rank 0" : "") << "\n";
    if (world > 1) {
        log << "data parallel: " << world << " ranks of " << rank_rows << " rows each (" << comm->describe() << "); "
            << shards.describe() << "\n";
        // Per step, each rank's gradient buffer is averaged over the ranks (fp32) and the updated
        // parameters, every rank's share, reach every rank: the whole buffer each way.
        const size_t buffer_bytes = layout.total * sizeof(float);
        const bool overlapped = options.overlap_reduction && comm->device_collectives();
        log << "data parallel: per step " << gigabytes(buffer_bytes) << " of gradients averaged ("
            << (overlapped ? "each block's beside the backward pass of the blocks below, the embeddings' after it"
                           : "after the backward pass")
            << ") and " << gigabytes(buffer_bytes) << " of parameter shares gathered\n";
    }
    if (!collectives_line.empty()) log << collectives_line << "\n";

    std::ofstream metrics;
    if (root) {
        metrics.open(options.out_dir + "/metrics.jsonl", std::ios::app);
        if (!metrics) fail(options.out_dir, "/metrics.jsonl: cannot open for writing");
    }
    auto write_metrics = [&](Json record) {
        if (!root) return;
        metrics << record.dump() << "\n";
        metrics.flush();
    };
    // The sum over ranks of a few numbers (themselves when alone).
    auto sum_over_ranks = [&](std::vector<double> values) {
        if (comm) comm->all_reduce_sum(values.data(), values.size());
        return values;
    };

    std::vector<int> inputs, targets;
    auto evaluate = [&]() {
        if (!val_loader) return double(NAN);
        val_loader->reset();
        uint64_t batches = val_loader->batches_per_epoch();
        if (options.val_batches > 0 && uint64_t(options.val_batches) < batches) batches = uint64_t(options.val_batches);
        double sum = 0;
        for (uint64_t b = 0; b < batches; ++b) {
            val_loader->next_batch(inputs, targets);
            sum += backend->loss(inputs.data(), targets.data(), rank_rows, options.seq_len);
        }
        // Each rank's loss is the mean over its rows: the batch's is their mean.
        return sum_over_ranks({sum})[0] / double(batches) / world;
    };
    auto report_val = [&](const char* when, double val_loss) {
        if (std::isnan(val_loss)) return;
        char line[160];
        std::snprintf(line, sizeof line, "val loss %.4f (perplexity %.1f) %s step %ld\n", val_loss, std::exp(val_loss),
                      when, state.step);
        log << line;
        Json record = Json::object();
        record["type"] = "val";
        record["step"] = int64_t(state.step);
        record["val_loss"] = val_loss;
        write_metrics(record);
    };
    TrainResult result;
    auto save = [&](bool must_succeed) -> std::string {
        Checkpoint ckpt;
        ckpt.config = config;
        state.train_position = train_loader.position();
        state.rng_state = rng.state();
        ckpt.state = state;
        ckpt.run = run_settings(options, optimizer, total_steps);
        ckpt.optimizer = backend->optimizer_state();
        if (comm) {  // every rank's share of the optimizer state, merged on rank 0
            std::vector<OptimizerState> shares;
            for (const std::string& bytes : comm->gather_to_root(serialize_state(ckpt.optimizer)))
                shares.push_back(parse_state(bytes, "a rank's optimizer state"));
            if (!root) return std::string();
            ckpt.optimizer = merge_rank_states(shares);
        }
        ckpt.params = backend->params();
        std::string path;
        try {
            path = write_checkpoint(options.out_dir, ckpt);
        } catch (const Error& e) {
            // A periodic checkpoint that cannot be written (disk full, quota) costs nothing yet:
            // the previous one is intact (the write is atomic), and the next interval tries again.
            if (must_succeed) throw;
            log << "warning: checkpoint at step " << state.step << " not written: " << e.what() << "; "
                << (result.last_checkpoint.empty() ? std::string("no earlier checkpoint")
                                                   : "the previous one (" + result.last_checkpoint + ") is intact")
                << ", training goes on\n";
            return result.last_checkpoint;
        }
        prune_checkpoints(options.out_dir, options.keep_checkpoints);
        log << "checkpoint: " << path << "\n";
        return path;
    };

    // The common-loss stop: true (and logged, and recorded in the metrics) once a validation
    // loss is at or below the target.
    auto reached_target = [&](double val_loss) {
        if (!(options.target_loss > 0 && val_loss <= options.target_loss)) return false;
        char line[200];
        std::snprintf(line, sizeof line, "reached the target validation loss %.4f (%.4f) at step %ld: stopping\n",
                      options.target_loss, val_loss, state.step);
        log << line;
        Json record = Json::object();
        record["type"] = "target";
        record["step"] = int64_t(state.step);
        record["val_loss"] = val_loss;
        record["target_loss"] = options.target_loss;
        write_metrics(record);
        result.reached_target = true;
        result.val_loss_end = val_loss;
        return true;
    };

    result.val_loss_start = evaluate();
    report_val("at", result.val_loss_start);
    reached_target(result.val_loss_start);  // a resumed run that had reached it trains no further

    const auto run_start = std::chrono::steady_clock::now();
    const long first_step = state.step;
    while (state.step < total_steps && !result.reached_target) {
        const auto step_start = std::chrono::steady_clock::now();
        const double lr = schedule.at(state.step);
        backend->zero_grads();
        double loss = 0;
        for (int micro = 0; micro < options.grad_accum; ++micro) {
            train_loader.next_batch(inputs, targets);
            // The last micro-batch's backward pass hands each block's gradients to the
            // reduction as soon as they are final.
            if (comm && options.overlap_reduction && micro == options.grad_accum - 1)
                backend->reduce_gradients_during_backward(*comm);
            loss += backend->forward_backward(inputs.data(), targets.data(), rank_rows, options.seq_len,
                                              1.0 / options.grad_accum) /
                    options.grad_accum;
        }
        if (comm) {  // the batch's gradient and loss: the mean of the ranks'
            backend->reduce_gradients(*comm);
            loss = sum_over_ranks({loss})[0] / world;
        }
        // Global-norm clipping: every gradient scaled by grad_clip / ||g|| when ||g|| > grad_clip.
        const double grad_norm = backend->grad_norm();
        const bool finite = std::isfinite(loss) && std::isfinite(grad_norm);
        if (finite) {
            const double clip_scale =
                options.grad_clip > 0 && grad_norm > options.grad_clip ? options.grad_clip / grad_norm : 1.0;
            backend->step(lr, clip_scale);
            if (comm) backend->share_parameters(*comm, ranges_by_rank);
        } else {
            ++state.skipped_steps;
            log << "warning: step " << state.step + 1 << " has a non-finite " << (std::isfinite(loss) ? "gradient" : "loss")
                << " (loss " << loss << ", grad norm " << grad_norm << "); update skipped (" << state.skipped_steps
                << " so far)\n";
            if (options.nan_policy == "stop") {
                result.last_checkpoint = save(true);
                fail("stopping on a non-finite step (--nan-policy stop); last good state saved in ",
                     result.last_checkpoint);
            }
        }
        // After the step, one sum over the ranks: the preconditioners rejected so far and the stop
        // requests. A request that came during start-up is acted on after the first step; it is
        // consumed, so a later run in the same process starts clean. Ranks stop together: a request
        // seen by any of them counts, so the rank that reads the flag (shared by thread ranks)
        // first may consume it. It is consumed as it is read: clearing it after the sum lost a
        // signal that came during the exchange (a SIGTERM'd 2-process run trained on to its end).
        const double stop_flag = double(g_stop_requested.exchange(0));
        const std::vector<double> after_step = sum_over_ranks({double(backend->rejected_preconditioners()), stop_flag});
        const long rejected = long(after_step[0]);
        const bool stop = after_step[1] > 0;
        if (rejected > result.rejected_preconditioners) {
            log << "warning: step " << state.step + 1 << ": " << rejected - result.rejected_preconditioners
                << " preconditioner matrix(es) came out non-finite and were not used; the last good ones stay ("
                << rejected << " in this run)\n";
            result.rejected_preconditioners = rejected;
        }
        ++state.step;
        state.tokens_seen += tokens_per_step;
        result.train_losses.push_back(loss);
        // Loss spikes: loss above loss_spike_factor x the running average (EMA, beta 0.9,
        // bias-corrected) of the finite losses before it, checked once 10 are in.
        bool spike = false;
        if (finite) {
            const double beta = 0.9;
            if (options.loss_spike_factor > 0 && state.loss_average_count >= 10) {
                const double average = state.loss_average / (1 - std::pow(beta, double(state.loss_average_count)));
                if (loss > options.loss_spike_factor * average) {
                    spike = true;
                    ++state.loss_spikes;
                    char line[200];
                    std::snprintf(line, sizeof line,
                                  "warning: loss spike at step %ld: loss %.4f is %.2fx the recent average %.4f (%ld so "
                                  "far)\n",
                                  state.step, loss, loss / average, average, state.loss_spikes);
                    log << line;
                }
            }
            state.loss_average = beta * state.loss_average + (1 - beta) * loss;
            ++state.loss_average_count;
        }

        const auto now = std::chrono::steady_clock::now();
        const double step_seconds = std::chrono::duration<double>(now - step_start).count();
        const double elapsed = std::chrono::duration<double>(now - run_start).count();
        const double tokens_per_second = double(tokens_per_step) / step_seconds;
        const double eta = elapsed / double(state.step - first_step) * double(total_steps - state.step);
        if (state.step % options.log_every == 0 || state.step == total_steps) {
            char line[256];
            std::snprintf(line, sizeof line,
                          "step %5ld/%ld | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s | elapsed %s | eta %s\n",
                          state.step, total_steps, loss, lr, grad_norm, tokens_per_second,
                          format_duration(elapsed).c_str(), format_duration(eta).c_str());
            log << line;
            log.flush();
        }
        Json record = Json::object();
        record["type"] = "train";
        record["step"] = int64_t(state.step);
        record["loss"] = loss;
        record["lr"] = lr;
        record["grad_norm"] = grad_norm;
        record["tokens_per_second"] = tokens_per_second;
        record["tokens_seen"] = state.tokens_seen;
        record["skipped"] = !finite;
        if (spike) record["spike"] = true;
        write_metrics(record);

        if (options.eval_every > 0 && state.step % options.eval_every == 0 && state.step < total_steps) {
            const double val_loss = evaluate();
            report_val("after", val_loss);
            if (reached_target(val_loss)) break;
        }
        if (options.checkpoint_every > 0 && state.step % options.checkpoint_every == 0 && state.step < total_steps)
            result.last_checkpoint = save(false);
        if (stop) {
            log << "stop requested: saving a checkpoint at step " << state.step << " and exiting\n";
            result.interrupted = true;
            break;
        }
    }
    if (!result.interrupted && !result.reached_target) {
        result.val_loss_end = evaluate();
        report_val("after", result.val_loss_end);
        if (options.target_loss > 0 && !reached_target(result.val_loss_end)) {
            char line[160];
            std::snprintf(line, sizeof line, "the target validation loss %.4f was not reached (%.4f at the end)\n",
                          options.target_loss, result.val_loss_end);
            log << line;
        }
    }
    EigenRefreshCounts refreshes = backend->eigen_refreshes();
    const std::vector<double> refresh_totals = sum_over_ranks({double(refreshes.kept), double(refreshes.decomposed)});
    refreshes.kept = long(refresh_totals[0]);
    refreshes.decomposed = long(refresh_totals[1]);
    if (refreshes.kept + refreshes.decomposed > 0)
        log << "shampoo: " << refreshes.kept << " of " << refreshes.kept + refreshes.decomposed
            << " factor refreshes kept the last eigenbasis (within --shampoo-eigen-tolerance), "
            << refreshes.decomposed << " ran an eigendecomposition\n";
    result.last_checkpoint = save(true);
    result.final_step = state.step;
    result.skipped_steps = state.skipped_steps;
    result.loss_spikes = state.loss_spikes;
    return result;
}

}  // namespace qopt
