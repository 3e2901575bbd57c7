// ZeRO-1's arithmetic (optim/shard_plan): who owns which tensors and matrices, how well that is
// balanced, that the owners' state is the unsharded state, and that ranks stepping only what they
// own and then sharing it reproduce a single process bit for bit (the algorithm a multi-GPU run
// carries out with NCCL; here the ranks are simulated one after another on the CPU).
#include <algorithm>
#include <map>

#include "core/error.hpp"
#include "helpers.hpp"
#include "zero1_variants.hpp"
#include "model/config.hpp"
#include "model/cpu_model.hpp"
#include "model/params.hpp"
#include "optim/shard_plan.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

std::map<std::string, std::vector<float>> by_name(const OptimizerState& state) {
    std::map<std::string, std::vector<float>> out;
    for (const StateTensor& t : state.tensors) out[t.name] = t.values;
    return out;
}

}  // namespace

TEST_CASE("ZeRO-1 plan: each slot owned once, ranges tile the buffer, greedy bound, state matches the optimizer's") {
    for (const Zero1Variant& v : zero1_variants()) {
        CAPTURE(v.name);
        for (const char* preset : {"gpt2-124m", "olmo2-350m", "olmo2-tiny"}) {
            CAPTURE(preset);
            const ParamLayout layout = ParamLayout::build(preset_config(preset));
            const Routing routing = route_parameters(layout, v.config);
            for (int world : {1, 2, 3, 4, 8}) {
                CAPTURE(world);
                const ShardPlan plan = plan_shards(routing, v.config, world);
                // Every parameter value is updated by exactly one rank.
                std::vector<ParamRange> all;
                for (int r = 0; r < world; ++r)
                    for (const ParamRange& range : plan.ranges_of(routing, r)) all.push_back(range);
                std::sort(all.begin(), all.end(), [](const ParamRange& a, const ParamRange& b) { return a.offset < b.offset; });
                size_t next = 0;
                for (const ParamRange& range : all) {
                    REQUIRE(range.offset == next);
                    next += range.count;
                }
                CHECK(next == layout.total);
                // Greedy bound on the matrix work: max <= total / W + (1 - 1/W) largest matrix.
                double total = 0, largest = 0;
                for (const MatrixSlot& m : routing.matrices) {
                    const double flops = matrix_step_flops(m.rows, m.cols, v.config);
                    total += flops;
                    largest = std::max(largest, flops);
                }
                const double heaviest = *std::max_element(plan.rank_flops.begin(), plan.rank_flops.end());
                CHECK(heaviest <= total / world + (1.0 - 1.0 / world) * largest + 1e-6 * total);
                // The same plan every time (all ranks compute it on their own).
                const ShardPlan again = plan_shards(routing, v.config, world);
                CHECK(again.matrix_owner == plan.matrix_owner);
                // Each element-wise tensor's shares cover its rows in order; only tensors whose
                // update treats rows apart are cut.
                auto check_shares = [&](const std::vector<std::vector<RowShare>>& shares,
                                        const std::vector<std::vector<RowShare>>& shares_again,
                                        const std::vector<TensorSlot>& slots, bool scion) {
                    for (size_t i = 0; i < shares.size(); ++i) {
                        REQUIRE(shares_again[i].size() == shares[i].size());
                        if (scion && !scion_rows_separable(slots[i].scion_norm)) CHECK(shares[i].size() == 1);
                        int row = 0;
                        for (size_t k = 0; k < shares[i].size(); ++k) {
                            const RowShare& share = shares[i][k];
                            CHECK(share.row_begin == row);
                            CHECK(share.row_end > share.row_begin);
                            CHECK(shares_again[i][k].rank == share.rank);
                            row = share.row_end;
                        }
                        CHECK(row == slots[i].rows);
                    }
                };
                check_shares(plan.adamw_shares, again.adamw_shares, routing.adamw, false);
                check_shares(plan.scion_shares, again.scion_shares, routing.scion, true);
                if (world == 1) CHECK(plan.flops_imbalance() == 1.0);
                // The tensors that can be cut fill each rank up to the mean state: no rank ends
                // above the mean by more than W rows unless the matrices and the whole Scion
                // tensors put it there.
                std::vector<size_t> before(size_t(world), 0);
                for (size_t i = 0; i < routing.matrices.size(); ++i)
                    before[size_t(plan.matrix_owner[i])] +=
                        matrix_state_floats(routing.matrices[i].rows, routing.matrices[i].cols, v.config) * sizeof(float);
                for (size_t i = 0; i < routing.scion.size(); ++i)
                    if (!scion_rows_separable(routing.scion[i].scion_norm))
                        before[size_t(plan.scion_shares[i][0].rank)] +=
                            elementwise_state_floats(routing.scion[i].numel, true) * 4;
                size_t total_bytes = 0, row_bytes = 0;
                for (size_t b : plan.rank_state_bytes) total_bytes += b;
                for (const TensorSlot& t : routing.adamw)
                    row_bytes = std::max(row_bytes, elementwise_state_floats(size_t(t.cols), false) * 4);
                for (const TensorSlot& t : routing.scion)
                    row_bytes = std::max(row_bytes, elementwise_state_floats(size_t(t.cols), true) * 4);
                const double mean = double(total_bytes) / world;
                for (int r = 0; r < world; ++r)
                    CHECK(double(plan.rank_state_bytes[size_t(r)]) <=
                          std::max(double(before[size_t(r)]), mean + double(world) * double(row_bytes)));
            }
            if (std::string(preset) == "gpt2-124m") {
                const ShardPlan two = plan_shards(routing, v.config, 2);
                MESSAGE(v.name << " gpt2-124m on 2 ranks: " << two.describe());
                // gpt2-124m's matrices are many and even: two ranks share the work and the state
                // within 10%.
                CHECK(two.flops_imbalance() < 1.1);
                CHECK(two.state_imbalance() < 1.1);
            }
        }
        // The plan's state sizes are the optimizer's own (its buffers, counted by state_bytes()).
        const ParamLayout tiny = ParamLayout::build(small_model("olmo2-tiny"));
        const Routing routing = route_parameters(tiny, v.config);
        const ShardPlan plan = plan_shards(routing, v.config, 3);
        size_t planned = 0, held = 0;
        for (int r = 0; r < 3; ++r) {
            planned += plan.rank_state_bytes[size_t(r)];
            const OwnedSlots owned = plan.owned_by(r);
            const size_t bytes = make_cpu_optimizer(tiny, v.config, &owned)->state_bytes();
            CHECK(bytes == plan.rank_state_bytes[size_t(r)]);
            held += bytes;
        }
        CHECK(planned == make_cpu_optimizer(tiny, v.config)->state_bytes());
        CHECK(held == planned);
    }
    OptimizerConfig c;
    const Routing routing = route_parameters(ParamLayout::build(small_model("olmo2-tiny")), c);
    CHECK_THROWS_WITH_AS(plan_shards(routing, c, 0), doctest::Contains("at least 1"), Error);
    CHECK_THROWS_WITH_AS(plan_shards(routing, c, 2).owned_by(2), doctest::Contains("rank 2 is outside 0..1"), Error);
}

TEST_CASE("ZeRO-1 steps: ranks stepping what they own, then sharing it, equal one process bit for bit; states "
          "merge and resume at another rank count") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    for (const char* preset : {"olmo2-tiny", "gpt2-tiny"}) {
        const ParamLayout layout = ParamLayout::build(small_model(preset));
        for (const Zero1Variant& v : zero1_variants()) {
            CAPTURE(preset);
            CAPTURE(v.name);
            const Routing routing = route_parameters(layout, v.config);
            std::mt19937_64 gen(seed);
            std::vector<float> single = random_vector<float>(layout.total, gen);
            auto grads_at = [&](int step) {
                std::mt19937_64 g(seed + uint64_t(step));
                return random_vector<float>(layout.total, g);
            };
            auto one = make_cpu_optimizer(layout, v.config);

            // W ranks, each with its own copy of the parameters; after each step every rank
            // takes the owners' values of what it does not own (the all-gather).
            struct Ranks {
                ShardPlan plan;
                std::vector<std::unique_ptr<Optimizer>> optimizers;
                std::vector<std::vector<float>> params;
            };
            auto make_ranks = [&](int world, const std::vector<float>& start) {
                Ranks ranks{plan_shards(routing, v.config, world), {}, {}};
                for (int r = 0; r < world; ++r) {
                    const OwnedSlots owned = ranks.plan.owned_by(r);
                    ranks.optimizers.push_back(make_cpu_optimizer(layout, v.config, &owned));
                    ranks.params.push_back(start);
                }
                return ranks;
            };
            auto step_ranks = [&](Ranks& ranks, int step) {
                const int world = ranks.plan.world_size;
                for (int r = 0; r < world; ++r) {
                    std::vector<float> g = grads_at(step);
                    ranks.optimizers[size_t(r)]->step(ranks.params[size_t(r)].data(), g.data(), 1e-3, 0.5);
                }
                std::vector<float> gathered(layout.total, NAN);
                for (int r = 0; r < world; ++r)
                    for (const ParamRange& range : ranks.plan.ranges_of(routing, r))
                        std::copy_n(ranks.params[size_t(r)].begin() + long(range.offset), range.count,
                                    gathered.begin() + long(range.offset));
                for (auto& p : ranks.params) p = gathered;
            };

            const int first_world = 3, second_world = 2;
            Ranks ranks = make_ranks(first_world, single);
            // Some element-wise tensor is cut between ranks, so row shares are exercised too
            // (with the preconditioned methods the matrices' state already fills the ranks).
            size_t cut = 0;
            for (const auto* list : {&ranks.plan.adamw_shares, &ranks.plan.scion_shares})
                for (const auto& shares : *list) cut += shares.size() > 1;
            const OptimizerKind kind = v.config.kind;
            if (kind == OptimizerKind::AdamW || kind == OptimizerKind::Muon || kind == OptimizerKind::Scion)
                CHECK(cut > 0);
            for (int step = 0; step < 3; ++step) {
                std::vector<float> g = grads_at(step);
                one->step(single.data(), g.data(), 1e-3, 0.5);
                step_ranks(ranks, step);
                REQUIRE(ranks.params[0] == single);
            }
            // The owners' states together are the single process's state.
            std::vector<OptimizerState> states;
            for (auto& o : ranks.optimizers) states.push_back(o->state());
            const OptimizerState merged = merge_rank_states(states);
            CHECK(by_name(merged) == by_name(one->state()));
            CHECK(merged.step == 3);
            CHECK(merged.extra.dump() == one->state().extra.dump());
            // Resume the merged state on a different number of ranks: still the same run.
            Ranks resumed = make_ranks(second_world, single);
            for (auto& o : resumed.optimizers) o->load_state(merged);
            for (int step = 3; step < 6; ++step) {
                std::vector<float> g = grads_at(step);
                one->step(single.data(), g.data(), 1e-3, 0.5);
                step_ranks(resumed, step);
                REQUIRE(resumed.params[1] == single);
            }
            for (float p : single) REQUIRE(std::isfinite(p));

            // Broken sets of rank states are refused by name.
            std::vector<OptimizerState> twice = {states[0], states[0]};
            if (!states[0].tensors.empty())
                CHECK_THROWS_WITH_AS(merge_rank_states(twice), doctest::Contains("is held by two ranks"), Error);
            std::vector<OptimizerState> behind = states;
            behind[1].step = 2;
            CHECK_THROWS_WITH_AS(merge_rank_states(behind), doctest::Contains("does not match rank 0's"), Error);
        }
    }
}

TEST_CASE("data parallelism: the mean of the ranks' gradients on their rows is the whole batch's gradient") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (const char* preset : {"olmo2-tiny", "gpt2-tiny"}) {
        CAPTURE(preset);
        const ModelConfig config = small_model(preset);
        CpuModel<double> model(config);
        init_params(model.layout(), seed, model.params().data());
        const int batch = 4, seq_len = 8, world = 2, rows = batch / world;
        const std::vector<int> inputs = random_tokens(size_t(batch) * seq_len, config.vocab_size, gen);
        const std::vector<int> targets = random_tokens(size_t(batch) * seq_len, config.vocab_size, gen);
        model.zero_grads();
        model.forward_backward(inputs.data(), targets.data(), batch, seq_len, 1.0);
        const std::vector<double> whole = model.grads();
        // Each rank's mean-loss gradient on its rows, averaged (the all-reduce divides by W).
        std::vector<double> averaged(whole.size(), 0.0);
        for (int r = 0; r < world; ++r) {
            model.zero_grads();
            const size_t at = size_t(r) * rows * seq_len;
            model.forward_backward(inputs.data() + at, targets.data() + at, rows, seq_len, 1.0);
            for (size_t i = 0; i < averaged.size(); ++i) averaged[i] += model.grads()[i] / world;
        }
        double diff = 0, norm = 0;
        for (size_t i = 0; i < whole.size(); ++i) {
            diff += (averaged[i] - whole[i]) * (averaged[i] - whole[i]);
            norm += whole[i] * whole[i];
        }
        CHECK(std::sqrt(diff / norm) < 1e-12);
    }
}
