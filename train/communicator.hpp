// What data-parallel ranks exchange during training, behind one interface. LocalGroup runs the
// ranks as threads of one process over shared memory: the CPU reference of a multi-rank run
// (the tests train with it). Every rank calls every operation in the same order; each returns
// on all ranks with the same result. Reductions add in rank order, so results are deterministic.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "optim/shard_plan.hpp"

namespace qopt {

// Collectives over GPU memory (NCCL, train/nccl_communicator.hpp), offered by a communicator that
// has them: the GPU backend hands its buffers over directly; with a communicator that has none it
// stages them through host memory. Same meaning as Communicator's host operations; they are
// enqueued on the default stream, in the order the ranks call them.
class DeviceCollectives {
public:
    virtual ~DeviceCollectives() = default;
    virtual void all_reduce_mean_on_device(float* device_values, size_t count) = 0;
    virtual void share_ranges_on_device(float* device_values,
                                        const std::vector<std::vector<ParamRange>>& ranges_by_rank) = 0;
    // all_reduce_mean_on_device, overlapped: it runs after the work the default stream has
    // enqueued so far (so a part of a buffer may be handed over as soon as the kernels that write
    // it are enqueued) and beside what the default stream does next. join_reductions(): the
    // default stream's later work waits for every such reduction. Every rank hands over the same
    // parts in the same order.
    virtual void all_reduce_mean_beside_default_stream(float* device_values, size_t count) = 0;
    virtual void join_reductions() = 0;
};

class Communicator {
public:
    virtual ~Communicator() = default;
    virtual int rank() const = 0;
    virtual int world_size() const = 0;
    // values = the mean over ranks of every rank's values.
    virtual void all_reduce_mean(float* values, size_t count) = 0;
    // values = the sum over ranks (small: losses, flags, norms).
    virtual void all_reduce_sum(double* values, size_t count) = 0;
    // For every rank r, the values in ranges_by_rank[r] are copied from rank r to all others
    // (after a ZeRO-1 step: each rank's updated share to everyone).
    virtual void share_ranges(float* values, const std::vector<std::vector<ParamRange>>& ranges_by_rank) = 0;
    // Rank 0 receives every rank's bytes, in rank order; the others receive nothing.
    virtual std::vector<std::string> gather_to_root(const std::string& bytes) = 0;
    virtual void barrier() = 0;
    virtual std::string describe() const = 0;  // for the run log: how the ranks are connected
    virtual DeviceCollectives* device_collectives() { return nullptr; }
    bool is_root() const { return rank() == 0; }

protected:
    // share_ranges' argument: one list per rank of the group, or an error saying so.
    void check_ranges_by_rank(const std::vector<std::vector<ParamRange>>& ranges_by_rank) const;
};

// `world_size` ranks as threads of this process: group.rank(r) is the communicator thread r uses.
class LocalGroup {
public:
    explicit LocalGroup(int world_size);
    ~LocalGroup();
    Communicator& rank(int r);
    // A rank that fails calls this: every rank waiting in (or later entering) an operation
    // throws an Error naming `why` instead of waiting for it forever.
    void abort(const std::string& why);

private:
    class Member;
    friend class Member;
    // A reusable barrier: the last of the ranks to arrive releases the others.
    void wait_all();

    int world_size_;
    std::mutex mutex_;
    std::condition_variable arrived_;
    int waiting_ = 0;
    uint64_t generation_ = 0;
    std::string aborted_;  // non-empty: why the group stopped
    // Per rank: the buffer it shares in the current operation.
    std::vector<const void*> shared_;
    std::vector<std::string> staged_bytes_;
    std::vector<std::unique_ptr<Member>> members_;
};

}  // namespace qopt
