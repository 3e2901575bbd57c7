#include "train/communicator.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace qopt {

void Communicator::check_ranges_by_rank(const std::vector<std::vector<ParamRange>>& ranges_by_rank) const {
    QOPT_CHECK(int(ranges_by_rank.size()) == world_size(), "share_ranges: ranges for ", ranges_by_rank.size(),
               " ranks, the group has ", world_size());
}

// Every operation: publish a pointer to this rank's input (or a staged copy), wait until all
// ranks have, read what is needed from the others into private results, wait again so that no
// rank changes its buffer while another still reads it, then write the result.
class LocalGroup::Member final : public Communicator {
public:
    Member(LocalGroup& group, int rank) : group_(group), rank_(rank) {}
    int rank() const override { return rank_; }
    int world_size() const override { return group_.world_size_; }

    void all_reduce_mean(float* values, size_t count) override {
        std::vector<float> mean(count);
        const int world = world_size();
        exchange(values, [&] {
            // Sum in rank order (in double), then divide: the same bits on every rank.
            for (size_t i = 0; i < count; ++i) {
                double sum = 0;
                for (int r = 0; r < world; ++r) sum += double(static_cast<const float*>(group_.shared_[size_t(r)])[i]);
                mean[i] = float(sum / world);
            }
        });
        std::copy(mean.begin(), mean.end(), values);
    }

    void all_reduce_sum(double* values, size_t count) override {
        std::vector<double> sum(count, 0.0);
        exchange(values, [&] {
            for (int r = 0; r < world_size(); ++r)
                for (size_t i = 0; i < count; ++i) sum[i] += static_cast<const double*>(group_.shared_[size_t(r)])[i];
        });
        std::copy(sum.begin(), sum.end(), values);
    }

    void share_ranges(float* values, const std::vector<std::vector<ParamRange>>& ranges_by_rank) override {
        check_ranges_by_rank(ranges_by_rank);
        // Read the others' shares into a copy, then take them once everyone has read.
        std::vector<std::pair<ParamRange, std::vector<float>>> received;
        exchange(values, [&] {
            for (int r = 0; r < world_size(); ++r) {
                if (r == rank_) continue;
                const float* source = static_cast<const float*>(group_.shared_[size_t(r)]);
                for (const ParamRange& range : ranges_by_rank[size_t(r)])
                    received.push_back({range, std::vector<float>(source + range.offset, source + range.offset + range.count)});
            }
        });
        for (const auto& [range, part] : received) std::copy(part.begin(), part.end(), values + range.offset);
    }

    std::vector<std::string> gather_to_root(const std::string& bytes) override {
        std::vector<std::string> all;
        group_.staged_bytes_[size_t(rank_)] = bytes;
        exchange(nullptr, [&] {
            if (rank_ == 0) all = group_.staged_bytes_;
        });
        return all;
    }

    void barrier() override { group_.wait_all(); }
    std::string describe() const override { return "threads of one process"; }

private:
    template <typename Read>
    void exchange(const void* mine, Read read) {
        group_.shared_[size_t(rank_)] = mine;
        group_.wait_all();
        read();
        group_.wait_all();
    }

    LocalGroup& group_;
    int rank_;
};

LocalGroup::LocalGroup(int world_size)
    : world_size_(world_size), shared_(size_t(std::max(world_size, 0))), staged_bytes_(size_t(std::max(world_size, 0))) {
    QOPT_CHECK(world_size >= 1, "a group needs at least 1 rank, got ", world_size);
    for (int r = 0; r < world_size; ++r) members_.push_back(std::make_unique<Member>(*this, r));
}

LocalGroup::~LocalGroup() = default;

Communicator& LocalGroup::rank(int r) {
    QOPT_CHECK(r >= 0 && r < world_size_, "rank ", r, " is outside 0..", world_size_ - 1);
    return *members_[size_t(r)];
}

void LocalGroup::abort(const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (aborted_.empty()) aborted_ = why.empty() ? "a rank failed" : why;
    arrived_.notify_all();
}

void LocalGroup::wait_all() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!aborted_.empty()) fail("another rank stopped: ", aborted_);
    const uint64_t generation = generation_;
    if (++waiting_ == world_size_) {
        waiting_ = 0;
        ++generation_;
        arrived_.notify_all();
        return;
    }
    arrived_.wait(lock, [&] { return generation_ != generation || !aborted_.empty(); });
    if (generation_ == generation) fail("another rank stopped: ", aborted_);
}

}  // namespace qopt
