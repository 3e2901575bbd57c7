#include "optim/shard_plan.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <sstream>

#include "core/error.hpp"

namespace qopt {

double matrix_step_flops(int rows, int cols, const OptimizerConfig& config) {
    return kElementwiseFlops * double(rows) * double(cols) + matrix_product_flops(rows, cols, config);
}

double matrix_product_flops(int rows, int cols, const OptimizerConfig& config) {
    const double m = rows, n = cols, s = std::min(m, n), l = std::max(m, n);
    switch (config.kind) {
        case OptimizerKind::AdamW: return 0.0;
        case OptimizerKind::Muon: return config.muon.ns_steps * (4 * s * s * l + 2 * s * s * s);
        case OptimizerKind::Scion: return config.scion.ns_steps * (4 * s * s * l + 2 * s * s * s);
        case OptimizerKind::Shampoo: {
            const double f = config.shampoo.precondition_frequency;
            double flops = 0;
            for (const ShampooBlock& b : shampoo_blocks(rows, cols, config.shampoo.block_size)) {
                const double br = b.block_rows, bc = b.block_cols;
                flops += 4 * br * bc * (br + bc) + 11 * (br * br * br + bc * bc * bc) / f;
            }
            return flops;
        }
        case OptimizerKind::Soap: {
            const SoapView view = soap_view(rows, cols, config.soap);
            const double f = config.soap.precondition_frequency, vm = view.rows, vn = view.cols;
            auto side = [&](double wide, double other) {
                return 6 * other * wide * wide + (12 * wide * wide * wide + 8 * other * wide * wide) / f;
            };
            return (view.left ? side(vm, vn) : 0.0) + (view.right ? side(vn, vm) : 0.0);
        }
        case OptimizerKind::Psgd: {
            const auto [left_diagonal, right_diagonal] = config.psgd.diagonal_factors(rows, cols);
            const double a = left_diagonal ? 0 : m, b = right_diagonal ? 0 : n, p = config.psgd.update_prob_max;
            return p * (9 * m * n * (a + b) + 4 * (a * a * a + b * b * b)) + (1 - p) * 2 * m * n * (a + b);
        }
    }
    return 0.0;
}

// Mirrors the CPU optimizer's buffers (optim/cpu_optimizer.cpp; the tests compare the two).
size_t matrix_state_floats(int rows, int cols, const OptimizerConfig& config) {
    const size_t m = size_t(rows), n = size_t(cols);
    switch (config.kind) {
        case OptimizerKind::AdamW: return 2 * m * n;  // (AdamW routes matrices as element-wise tensors)
        case OptimizerKind::Muon:
        case OptimizerKind::Scion: return m * n;
        case OptimizerKind::Shampoo: {
            const ShampooConfig& c = config.shampoo;
            size_t floats = 0;
            for (const ShampooBlock& b : shampoo_blocks(rows, cols, c.block_size)) {
                const size_t br = size_t(b.block_rows), bc = size_t(b.block_cols), values = br * bc;
                floats += 2 * (br * br + bc * bc) + 2 * values;                // factors, roots, filtered, graft
                if (c.momentum > 0) floats += values;                          // momentum
                if (c.keeps_eigenbasis()) floats += br * br + br + bc * bc + bc;  // kept eigenpairs
                if (c.refresh_lag > 0) floats += br * br + bc * bc;            // pending roots
            }
            return floats;
        }
        case OptimizerKind::Soap: {
            const SoapView view = soap_view(rows, cols, config.soap);
            const size_t vm = size_t(view.rows), vn = size_t(view.cols);
            return 2 * m * n + (view.left ? 2 * vm * vm : 0) + (view.right ? 2 * vn * vn : 0);
        }
        case OptimizerKind::Psgd: {
            const auto [left_diagonal, right_diagonal] = config.psgd.diagonal_factors(rows, cols);
            return m * n + (left_diagonal ? m : m * m) + (right_diagonal ? n : n * n);
        }
    }
    return 0;
}

size_t elementwise_state_floats(size_t numel, bool scion_rule) {
    return scion_rule ? numel : 2 * numel;  // Scion's momentum; AdamW's two moments
}

ShardPlan plan_shards(const Routing& routing, const OptimizerConfig& config, int world_size) {
    QOPT_CHECK(world_size >= 1, "the number of ranks must be at least 1, got ", world_size);
    ShardPlan plan;
    plan.world_size = world_size;
    plan.rank_flops.assign(size_t(world_size), 0.0);
    plan.rank_state_bytes.assign(size_t(world_size), 0);
    plan.adamw_shares.assign(routing.adamw.size(), {});
    plan.scion_shares.assign(routing.scion.size(), {});
    plan.matrix_owner.assign(routing.matrices.size(), 0);

    // The rank with the least `load`; among equals the one with the fewest state bytes, then the lowest.
    auto lightest = [&](const auto& load) {
        int best = 0;
        for (int r = 1; r < world_size; ++r) {
            const size_t b = size_t(best), c = size_t(r);
            if (load[c] < load[b] || (load[c] == load[b] && plan.rank_state_bytes[c] < plan.rank_state_bytes[b]))
                best = r;
        }
        return best;
    };
    // Slots in descending order of `weight`, slot order among equals (stable): a fixed plan.
    auto heaviest_first = [](const std::vector<double>& weight) {
        std::vector<size_t> order(weight.size());
        std::iota(order.begin(), order.end(), size_t(0));
        std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return weight[a] > weight[b]; });
        return order;
    };

    std::vector<double> matrix_flops;
    for (const MatrixSlot& m : routing.matrices) matrix_flops.push_back(matrix_step_flops(m.rows, m.cols, config));
    for (size_t i : heaviest_first(matrix_flops)) {
        const MatrixSlot& m = routing.matrices[i];
        const int rank = lightest(plan.rank_flops);
        plan.matrix_owner[i] = rank;
        plan.rank_flops[size_t(rank)] += matrix_flops[i];
        plan.rank_state_bytes[size_t(rank)] += matrix_state_floats(m.rows, m.cols, config) * sizeof(float);
    }

    // Scion's tensors whose rule needs them whole (BiasRMS).
    std::vector<double> whole_bytes(routing.scion.size(), 0.0);
    for (size_t i = 0; i < routing.scion.size(); ++i)
        if (!scion_rows_separable(routing.scion[i].scion_norm))
            whole_bytes[i] = double(elementwise_state_floats(routing.scion[i].numel, true) * sizeof(float));
    for (size_t i : heaviest_first(whole_bytes)) {
        if (whole_bytes[i] == 0) continue;
        const int rank = lightest(plan.rank_state_bytes);
        plan.scion_shares[i].push_back({rank, 0, routing.scion[i].rows});
        plan.rank_state_bytes[size_t(rank)] += size_t(whole_bytes[i]);
    }

    // The tensors that can be cut, end to end in buffer order, each rank filled in turn up to the mean.
    struct Cuttable {
        const TensorSlot* slot;
        bool scion;
        std::vector<RowShare>* shares;
    };
    std::vector<Cuttable> cuttable;
    for (size_t i = 0; i < routing.adamw.size(); ++i) cuttable.push_back({&routing.adamw[i], false, &plan.adamw_shares[i]});
    for (size_t i = 0; i < routing.scion.size(); ++i)
        if (scion_rows_separable(routing.scion[i].scion_norm))
            cuttable.push_back({&routing.scion[i], true, &plan.scion_shares[i]});
    std::stable_sort(cuttable.begin(), cuttable.end(),
                     [](const Cuttable& a, const Cuttable& b) { return a.slot->offset < b.slot->offset; });
    size_t total_bytes = 0;
    for (size_t b : plan.rank_state_bytes) total_bytes += b;
    for (const Cuttable& c : cuttable) total_bytes += elementwise_state_floats(c.slot->numel, c.scion) * sizeof(float);
    const double mean_bytes = double(total_bytes) / world_size;
    int rank = 0;
    for (const Cuttable& c : cuttable) {
        const TensorSlot& t = *c.slot;
        const size_t row_bytes = elementwise_state_floats(size_t(t.cols), c.scion) * sizeof(float);
        int row = 0;
        while (row < t.rows) {
            int take = t.rows - row;  // the last rank takes everything left
            if (rank < world_size - 1) {
                const double room = mean_bytes - double(plan.rank_state_bytes[size_t(rank)]);
                const double fits = std::max(0.0, std::round(room / double(row_bytes)));
                if (fits < 1) {  // this rank is full: the next one
                    ++rank;
                    continue;
                }
                take = int(std::min<double>(take, fits));
            }
            c.shares->push_back({rank, row, row + take});
            plan.rank_state_bytes[size_t(rank)] += size_t(take) * row_bytes;
            row += take;
        }
    }
    return plan;
}

OwnedSlots ShardPlan::owned_by(int rank) const {
    QOPT_CHECK(rank >= 0 && rank < world_size, "rank ", rank, " is outside 0..", world_size - 1);
    auto rows_of = [&](const std::vector<RowShare>& shares) {
        RowRange rows;
        for (const RowShare& share : shares)
            if (share.rank == rank) rows = {share.row_begin, share.row_end};
        return rows;
    };
    OwnedSlots owned;
    for (const auto& shares : adamw_shares) owned.adamw.push_back(rows_of(shares));
    for (const auto& shares : scion_shares) owned.scion.push_back(rows_of(shares));
    for (int owner : matrix_owner) owned.matrices.push_back(owner == rank);
    return owned;
}

std::vector<ParamRange> ShardPlan::ranges_of(const Routing& routing, int rank) const {
    const OwnedSlots owned = owned_by(rank);
    std::vector<ParamRange> ranges;
    auto add_rows = [&](const TensorSlot& slot, const RowRange& rows) {
        if (rows.count() > 0) ranges.push_back(owned_range(slot, rows));
    };
    for (size_t i = 0; i < routing.adamw.size(); ++i) add_rows(routing.adamw[i], owned.adamw[i]);
    for (size_t i = 0; i < routing.scion.size(); ++i) add_rows(routing.scion[i], owned.scion[i]);
    for (size_t i = 0; i < routing.matrices.size(); ++i)
        if (owned.matrices[i])
            ranges.push_back({routing.matrices[i].offset, size_t(routing.matrices[i].rows) * routing.matrices[i].cols});
    std::sort(ranges.begin(), ranges.end(), [](const ParamRange& a, const ParamRange& b) { return a.offset < b.offset; });
    std::vector<ParamRange> merged;
    for (const ParamRange& r : ranges) {
        if (!merged.empty() && merged.back().offset + merged.back().count == r.offset)
            merged.back().count += r.count;
        else
            merged.push_back(r);
    }
    return merged;
}

namespace {
template <typename T>
double max_over_mean(const std::vector<T>& load) {
    const double total = std::accumulate(load.begin(), load.end(), 0.0);
    if (total <= 0) return 1.0;
    return double(*std::max_element(load.begin(), load.end())) / (total / double(load.size()));
}
}  // namespace

double ShardPlan::flops_imbalance() const { return max_over_mean(rank_flops); }
double ShardPlan::state_imbalance() const { return max_over_mean(rank_state_bytes); }

std::string ShardPlan::describe() const {
    std::ostringstream out;
    out << "optimizer shards over " << world_size << " rank(s):";
    for (int r = 0; r < world_size; ++r) {
        size_t units = 0;
        for (const auto* list : {&adamw_shares, &scion_shares})
            for (const auto& shares : *list)
                for (const RowShare& share : shares) units += share.rank == r;
        for (int o : matrix_owner) units += o == r;
        out << (r ? ";" : "") << " rank " << r << " " << units << " tensors, " << rank_flops[size_t(r)] / 1e9
            << " GFLOP/step, " << double(rank_state_bytes[size_t(r)]) / (1 << 20) << " MiB state";
    }
    out.precision(3);
    out << " (imbalance: work " << flops_imbalance() << ", state " << state_imbalance() << ")";
    return out.str();
}

OptimizerState merge_rank_states(const std::vector<OptimizerState>& ranks) {
    QOPT_CHECK(!ranks.empty(), "no rank states to merge");
    OptimizerState merged;
    merged.optimizer = ranks[0].optimizer;
    merged.step = ranks[0].step;
    merged.extra = ranks[0].extra;
    // Each name's parts, in the order names first appear.
    std::vector<std::string> order;
    std::map<std::string, std::vector<const StateTensor*>> parts;
    for (size_t r = 0; r < ranks.size(); ++r) {
        const OptimizerState& s = ranks[r];
        QOPT_CHECK(s.optimizer == merged.optimizer && s.step == merged.step, "rank ", r, "'s optimizer state (",
                   s.optimizer, ", step ", s.step, ") does not match rank 0's (", merged.optimizer, ", step ",
                   merged.step, ")");
        QOPT_CHECK(s.extra.dump() == merged.extra.dump(), "rank ", r,
                   "'s optimizer scalars differ from rank 0's (the ranks' schedules went apart)");
        for (const StateTensor& t : s.tensors) {
            auto& list = parts[t.name];
            if (list.empty()) order.push_back(t.name);
            list.push_back(&t);
        }
    }
    for (const std::string& name : order) {
        std::vector<const StateTensor*> list = parts[name];
        std::sort(list.begin(), list.end(), [](const StateTensor* a, const StateTensor* b) { return a->row_begin < b->row_begin; });
        StateTensor whole{name, list[0]->shape, {}, 0};
        int64_t rows = 0;
        for (const StateTensor* t : list) {
            QOPT_CHECK(t->row_begin == rows && !t->shape.empty() &&
                           std::equal(t->shape.begin() + 1, t->shape.end(), whole.shape.begin() + 1, whole.shape.end()),
                       "optimizer state tensor ", name, " is held by two ranks, or its row parts do not fit together");
            rows += t->shape[0];
            whole.values.insert(whole.values.end(), t->values.begin(), t->values.end());
        }
        whole.shape[0] = rows;
        merged.tensors.push_back(std::move(whole));
    }
    return merged;
}

}  // namespace qopt
