// Data parallelism on GPUs: the GPU optimizers' ZeRO-1 shares (each rank's GpuOptimizer keeps
// and steps only what it owns) against one GpuOptimizer; training with GPU ranks as processes
// (train --nproc 2 --device cuda) against one GPU process, with checkpoints moving between rank
// counts; and the NCCL communicator. On a machine with one GPU the ranks share it and exchange
// through host memory (--collectives host); the NCCL run between two GPUs needs two of them.
#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>

#include "core/error.hpp"
#include "gpu_helpers.hpp"
#include "train_helpers.hpp"
#include "zero1_variants.hpp"
#include "kernels/side_stream.hpp"
#include "model/gpu_model.hpp"
#include "optim/gpu_optimizer.hpp"
#include "train/backend.hpp"
#include "optim/shard_plan.hpp"
#include "train/communicator.hpp"
#include "train/nccl_communicator.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

// ||a - b|| / ||b||, over the changes from `start` when given.
double relative_difference(const std::vector<float>& a, const std::vector<float>& b,
                           const std::vector<float>* start = nullptr) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        const double base = start ? double((*start)[i]) : 0.0;
        diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        norm += (double(b[i]) - base) * (double(b[i]) - base);
    }
    return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// How far a sharded GPU run may drift from one GpuOptimizer: element-wise rules are the same
// kernel per value (bit for bit); matrix methods batch fewer matrices per product, so cuBLAS and
// cuSOLVER may pick other kernels and round differently (measured on an H100: 0 for Muon, Scion
// and Shampoo, ~3e-6 for PSGD); SOAP's eigenbasis turns with last bits (its bound is the one its
// GPU-vs-CPU test uses).
double zero1_bound(OptimizerKind kind) {
    switch (kind) {
        case OptimizerKind::AdamW: return 0;
        case OptimizerKind::Soap: return 1e-2;
        default: return 1e-3;
    }
}

// Steps before the ranks take over: enough for every factor of the tiny models (at most 256 wide,
// rank 64 per step) to be full rank, so that SOAP's eigenbases are set by the factors and not by
// rounding in their null spaces (where a batch of another size legitimately picks other vectors:
// 0.52 from scratch on an H100).
constexpr int kWarmupSteps = 8;

}  // namespace

// Skips (and says why) where NCCL cannot be loaded.
#define REQUIRE_NCCL()                                                                     \
    if (const std::string nccl_problem = nccl_unavailable_reason(); !nccl_problem.empty()) { \
        MESSAGE("skipped: " << nccl_problem);                                              \
        return;                                                                            \
    }

TEST_CASE("GPU ZeRO-1: ranks stepping their shares on the GPU and sharing them follow one GPU optimizer; their "
          "states merge into its state and resume at another rank count") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    for (const std::string preset : {"olmo2-tiny", "gpt2-tiny"}) {
        const ParamLayout layout = ParamLayout::build(small_model(preset.c_str()));
        for (const Zero1Variant& v : zero1_variants()) {
            CAPTURE(preset);
            CAPTURE(v.name);
            const Routing routing = route_parameters(layout, v.config);
            std::mt19937_64 gen(seed);
            const std::vector<float> start = random_vector<float>(layout.total, gen);
            auto grads_at = [&](int step) {
                std::mt19937_64 g(seed + uint64_t(step));
                return random_vector<float>(layout.total, g);
            };
            GpuOptimizer one(layout, v.config);
            DeviceBuffer<float> single = uploaded(start);

            struct Ranks {
                ShardPlan plan;
                std::vector<std::unique_ptr<GpuOptimizer>> optimizers;
                std::vector<DeviceBuffer<float>> params;
            };
            auto make_ranks = [&](int world, const std::vector<float>& values) {
                Ranks ranks{plan_shards(routing, v.config, world), {}, {}};
                for (int r = 0; r < world; ++r) {
                    const OwnedSlots owned = ranks.plan.owned_by(r);
                    ranks.optimizers.push_back(std::make_unique<GpuOptimizer>(layout, v.config, &owned));
                    ranks.params.push_back(uploaded(values));
                }
                return ranks;
            };
            // Every rank steps its share; then each takes the owners' values (the all-gather).
            auto step_ranks = [&](Ranks& ranks, int step) {
                const int world = ranks.plan.world_size;
                const DeviceBuffer<float> grads = uploaded(grads_at(step));
                for (int r = 0; r < world; ++r)
                    ranks.optimizers[size_t(r)]->step(ranks.params[size_t(r)].data(), grads.data(), 1e-3, 0.5,
                                                      nullptr);
                std::vector<float> gathered(layout.total, NAN);
                for (int r = 0; r < world; ++r) {
                    const std::vector<float> mine = ranks.params[size_t(r)].download();
                    for (const ParamRange& range : ranks.plan.ranges_of(routing, r))
                        std::copy_n(mine.begin() + long(range.offset), range.count, gathered.begin() + long(range.offset));
                }
                for (auto& p : ranks.params) p.upload(gathered);
            };
            auto step_one = [&](int step) {
                const DeviceBuffer<float> grads = uploaded(grads_at(step));
                one.step(single.data(), grads.data(), 1e-3, 0.5, nullptr);
            };

            // The ranks take the single optimizer's state after the warm-up (whole tensors in, each
            // keeps its share), then step along with it.
            for (int step = 0; step < kWarmupSteps; ++step) step_one(step);
            const std::vector<float> warm = single.download();
            Ranks ranks = make_ranks(3, warm);
            for (auto& o : ranks.optimizers) o->load_state(one.state());
            for (int step = kWarmupSteps; step < kWarmupSteps + 3; ++step) {
                step_one(step);
                step_ranks(ranks, step);
            }
            const std::vector<float> after_three = single.download();
            const double drift = relative_difference(ranks.params[0].download(), after_three, &warm);
            MESSAGE(preset << ", " << v.name << ": 3 ranks against one, relative difference of the weight changes "
                           << drift);
            CHECK(drift <= zero1_bound(v.config.kind));

            // The owners' states together are the single optimizer's: the same tensors, values
            // as close as the weights.
            std::vector<OptimizerState> states;
            for (auto& o : ranks.optimizers) states.push_back(o->state());
            const OptimizerState merged = merge_rank_states(states), whole = one.state();
            CHECK(merged.step == kWarmupSteps + 3);
            CHECK(merged.extra.dump() == whole.extra.dump());
            REQUIRE(merged.tensors.size() == whole.tensors.size());
            std::map<std::string, const StateTensor*> by_name;
            for (const StateTensor& t : merged.tensors) by_name[t.name] = &t;
            for (const StateTensor& t : whole.tensors) {
                CAPTURE(t.name);
                REQUIRE(by_name.count(t.name));
                CHECK(by_name[t.name]->shape == t.shape);
                if (v.config.kind == OptimizerKind::AdamW) CHECK(by_name[t.name]->values == t.values);
            }

            // The merged state resumed on 2 ranks (from the single run's weights) follows it on.
            Ranks resumed = make_ranks(2, after_three);
            for (auto& o : resumed.optimizers) o->load_state(merged);
            for (int step = kWarmupSteps + 3; step < kWarmupSteps + 6; ++step) {
                step_one(step);
                step_ranks(resumed, step);
            }
            const std::vector<float> after_six = single.download();
            const double resumed_drift = relative_difference(resumed.params[1].download(), after_six, &after_three);
            CHECK(resumed_drift <= zero1_bound(v.config.kind));
            for (float p : after_six) REQUIRE(std::isfinite(p));
        }
    }
}

TEST_CASE("GPU data-parallel training: train --nproc 2 --device cuda follows the single-GPU run for all six "
          "optimizers; checkpoints move between 1 and 2 ranks") {
    REQUIRE_GPU();
    TempDir dir;
    const TrainOptions o = tiny_run(dir, 6);  // writes the shards
    // One GPU here: the two ranks share it and exchange through host memory. With two or more,
    // auto takes NCCL (see the NCCL case below).
    const std::string collectives = cuda_device_count() >= 2 ? "auto" : "host";
    const std::string common = bin("train") + " --device cuda --preset olmo2-tiny --vocab-size 64 --max-seq-len 32 "
                               "--train-data " + o.train_data + " --val-data " + o.val_data +
                               " --batch-size 4 --seq-len 32 --steps 6 --val-batches 2 --checkpoint-every 3";
    for (const std::string name : {"adamw", "muon", "scion", "shampoo", "soap", "psgd"}) {
        CAPTURE(name);
        const std::string run = common + " --optimizer " + name;
        const std::string one_dir = dir / ("one_" + name), two_dir = dir / ("two_" + name);
        std::string output;
        REQUIRE_MESSAGE(run_command(run + " --out-dir " + one_dir, output) == 0, output);
        REQUIRE_MESSAGE(run_command(run + " --nproc 2 --collectives " + collectives + " --out-dir " + two_dir, output) == 0,
                        output);
        CHECK(output.find("data parallel: 2 ranks of 2 rows each") != std::string::npos);
        const std::vector<double> one = metrics_train_losses(one_dir + "/metrics.jsonl"),
                                  two = metrics_train_losses(two_dir + "/metrics.jsonl");
        REQUIRE(one.size() == 6);
        REQUIRE(two.size() == 6);
        // The same batch, its rows split over two ranks: the losses agree to bf16 rounding.
        double worst = 0;
        for (size_t i = 0; i < one.size(); ++i) worst = std::max(worst, std::abs(one[i] - two[i]) / one[i]);
        MESSAGE(name << ": 2 GPU ranks (" << collectives << ") against one, largest relative loss difference over 6 "
                     << "steps " << worst);
        CHECK(worst <= 2e-2);
        const Checkpoint end_one = read_checkpoint(list_checkpoints(one_dir)[0]),
                         end_two = read_checkpoint(list_checkpoints(two_dir)[0]);
        // SOAP starts from factors of low rank, whose eigenbases the batch's rounding picks (the
        // ZeRO-1 case above): its weights part by a few percent (3.5% on an H100) while its losses
        // agree; every other method's weights agree as closely as the losses.
        const double weights = relative_difference(end_two.params, end_one.params);
        MESSAGE(name << ": weights after 6 steps, relative difference " << weights);
        CHECK(weights <= (name == "soap" ? 0.1 : 2e-2));
        // The 2-rank checkpoint holds the whole (merged) optimizer state.
        CHECK(end_two.optimizer.total_floats() == end_one.optimizer.total_floats());
    }
    // Resume across rank counts: the 2-rank run's step-3 checkpoint on 1 GPU, the 1-GPU run's on 2.
    const std::string run = common + " --optimizer shampoo";
    std::string output;
    REQUIRE_MESSAGE(run_command(run + " --resume " + (dir / "two_shampoo/checkpoints/") + checkpoint_name(3) +
                                    " --out-dir " + (dir / "two_then_one"),
                                output) == 0,
                    output);
    REQUIRE_MESSAGE(run_command(run + " --nproc 2 --collectives " + collectives + " --resume " +
                                    (dir / "one_shampoo/checkpoints/") + checkpoint_name(3) + " --out-dir " +
                                    (dir / "one_then_two"),
                                output) == 0,
                    output);
    const std::vector<double> full = metrics_train_losses(dir / "one_shampoo/metrics.jsonl");
    for (const std::string resumed : {"two_then_one", "one_then_two"}) {
        CAPTURE(resumed);
        const std::vector<double> rest = metrics_train_losses(dir / resumed + "/metrics.jsonl");
        REQUIRE(rest.size() == 3);
        for (size_t i = 0; i < 3; ++i) CHECK(std::abs(rest[i] - full[3 + i]) <= 2e-2 * full[3 + i]);
    }
}

TEST_CASE("GPU data parallelism: bad collectives are refused by name") {
    REQUIRE_GPU();
    TempDir dir;
    const TrainOptions o = tiny_run(dir, 2);
    const std::string common = bin("train") + " --device cuda --preset olmo2-tiny --vocab-size 64 --max-seq-len 32 "
                               "--train-data " + o.train_data + " --batch-size 4 --seq-len 32 --steps 2";
    std::string output;
    CHECK(run_command(common + " --nproc 2 --collectives mpi --out-dir " + (dir / "bad"), output) != 0);
    CHECK(output.find("--collectives") != std::string::npos);
    if (cuda_device_count() == 1) {
        // Two ranks on one GPU cannot use NCCL: said before NCCL is asked.
        CHECK(run_command(common + " --nproc 2 --collectives nccl --out-dir " + (dir / "shared"), output) == 1);
        CHECK(output.find("--collectives nccl: ranks share GPUs") != std::string::npos);
    }
    CHECK(run_command(common + " --cpu-ranks 2 --out-dir " + (dir / "threads"), output) == 1);
    CHECK(output.find("on GPUs start one process per rank") != std::string::npos);
}

TEST_CASE("GPU NCCL communicator: loads, joins a group of one, and its device collectives keep a lone rank's values") {
    REQUIRE_GPU();
    REQUIRE_NCCL();
    LocalGroup host(1);
    std::unique_ptr<Communicator> nccl = make_nccl_communicator(host.rank(0));
    CHECK(nccl->describe().find("NCCL 2.") == 0);
    DeviceCollectives* device = nccl->device_collectives();
    REQUIRE(device != nullptr);
    std::mt19937_64 gen(fresh_seed());
    const std::vector<float> values = random_vector<float>(1000, gen);
    DeviceBuffer<float> buffer = uploaded(values);
    device->all_reduce_mean_on_device(buffer.data(), values.size());
    device->share_ranges_on_device(buffer.data(), {{{0, 400}, {600, 400}}});
    CHECK(buffer.download() == values);
    // Host operations pass through to the host group.
    double sum = 2.5;
    nccl->all_reduce_sum(&sum, 1);
    CHECK(sum == 2.5);
}

TEST_CASE("GPU overlapped reduction: the backward pass hands over each block's gradients once, after they are "
          "final, and a side stream behind the default stream sees them as they end") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (const char* preset : {"olmo2-mini", "gpt2-mini"}) {
        CAPTURE(preset);
        ModelConfig config = preset_config(preset);
        config.vocab_size = 1000;
        config.padded_vocab_size = 1024;
        const int batch = 8, seq_len = 128;
        config.max_seq_len = seq_len;
        GpuModel model(config);
        const ParamLayout& layout = model.layout();
        std::vector<float> params(layout.total);
        init_params(layout, seed, params.data());
        model.upload_params(params);
        // What the reduction would see: each part copied on the side stream when handed over.
        DeviceBuffer<float> seen(layout.total);
        REQUIRE(cudaMemset(seen.data(), 0, layout.total * sizeof(float)) == cudaSuccess);
        SideStream side;
        std::vector<ParamRange> parts;
        model.zero_grads();
        for (int micro = 0; micro < 2; ++micro) {  // the hook on the last micro-batch only, as in training
            if (micro == 1)
                model.set_gradients_ready_hook([&](size_t offset, size_t count) {
                    parts.push_back({offset, count});
                    REQUIRE(cudaMemcpyAsync(seen.data() + offset, model.grads_device() + offset,
                                            count * sizeof(float), cudaMemcpyDeviceToDevice,
                                            side.after_default_stream()) == cudaSuccess);
                });
            const std::vector<int> inputs = random_tokens(size_t(batch) * seq_len, config.vocab_size, gen),
                                   targets = random_tokens(size_t(batch) * seq_len, config.vocab_size, gen);
            model.forward_backward(inputs.data(), targets.data(), batch, seq_len, 0.5f);
        }
        model.set_gradients_ready_hook(nullptr);
        side.join_into_default_stream();
        // The parts: the top block with the final norm first, then each block below, then the
        // embeddings: disjoint, in order, covering the buffer.
        REQUIRE(int(parts.size()) == config.n_layers + 1);
        size_t end = layout.total;
        for (size_t i = 0; i < parts.size(); ++i) {
            const size_t begin = i < size_t(config.n_layers) ? layout.layer_starts[size_t(config.n_layers) - 1 - i] : 0;
            CHECK(parts[i].offset == begin);
            CHECK(parts[i].offset + parts[i].count == end);
            end = parts[i].offset;
        }
        CHECK(end == 0);
        // What the side stream copied is the final gradient, bit for bit.
        CHECK(model.download_grads() == seen.download());
    }
}

TEST_CASE("GPU overlapped reduction through NCCL in a group of one: the same gradients and step as without it") {
    REQUIRE_GPU();
    REQUIRE_NCCL();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    LocalGroup host(1);
    std::unique_ptr<Communicator> nccl = make_nccl_communicator(host.rank(0));
    for (const char* preset : {"olmo2-tiny", "gpt2-tiny"}) {
        CAPTURE(preset);
        const ModelConfig config = small_model(preset);
        OptimizerConfig optimizer;
        optimizer.kind = OptimizerKind::Muon;
        std::vector<float> params(ParamLayout::build(config).total);
        init_params(ParamLayout::build(config), seed, params.data());
        std::vector<std::vector<float>> after;
        std::vector<double> norms;
        for (bool overlap : {false, true}) {
            CAPTURE(overlap);
            std::unique_ptr<TrainBackend> backend = make_cuda_backend(config, optimizer);
            backend->set_params(params);
            std::mt19937_64 gen(seed);
            for (int step = 0; step < 3; ++step) {
                backend->zero_grads();
                for (int micro = 0; micro < 2; ++micro) {
                    if (overlap && micro == 1) backend->reduce_gradients_during_backward(*nccl);
                    const std::vector<int> inputs = random_tokens(4 * 8, config.vocab_size, gen),
                                           targets = random_tokens(4 * 8, config.vocab_size, gen);
                    backend->forward_backward(inputs.data(), targets.data(), 4, 8, 0.5);
                }
                backend->reduce_gradients(*nccl);
                norms.push_back(backend->grad_norm());
                backend->step(1e-2, 1.0);
            }
            after.push_back(backend->params());
        }
        // A lone rank's mean is its own gradient: both runs bit for bit.
        CHECK(std::equal(norms.begin(), norms.begin() + 3, norms.begin() + 3));
        CHECK(after[0] == after[1]);
        CHECK(after[0] != params);
    }
}

TEST_CASE("GPU NCCL between two GPUs: train --nproc 2 --collectives nccl follows --collectives host") {
    REQUIRE_GPU();
    if (cuda_device_count() < 2 || !nccl_unavailable_reason().empty()) {
        MESSAGE("skipped: needs two GPUs and NCCL (this machine: " << cuda_device_count() << " GPU(s)"
                << (nccl_unavailable_reason().empty() ? "" : ", " + nccl_unavailable_reason()) << ")");
        return;
    }
    TempDir dir;
    const TrainOptions o = tiny_run(dir, 6);
    const std::string common = bin("train") + " --device cuda --preset olmo2-tiny --vocab-size 64 --max-seq-len 32 "
                               "--train-data " + o.train_data + " --batch-size 4 --seq-len 32 --steps 6 --nproc 2";
    for (const std::string name : {"adamw", "shampoo"}) {
        CAPTURE(name);
        std::string output;
        const std::string nccl_dir = dir / ("nccl_" + name), host_dir = dir / ("host_" + name);
        REQUIRE_MESSAGE(run_command(common + " --optimizer " + name + " --collectives nccl --out-dir " + nccl_dir,
                                    output) == 0,
                        output);
        CHECK(output.find("NCCL 2.") != std::string::npos);
        REQUIRE_MESSAGE(run_command(common + " --optimizer " + name + " --collectives host --out-dir " + host_dir,
                                    output) == 0,
                        output);
        const std::vector<double> nccl = metrics_train_losses(nccl_dir + "/metrics.jsonl"),
                                  host = metrics_train_losses(host_dir + "/metrics.jsonl");
        REQUIRE(nccl.size() == host.size());
        for (size_t i = 0; i < nccl.size(); ++i) CHECK(std::abs(nccl[i] - host[i]) <= 1e-3 * host[i]);
    }
}
