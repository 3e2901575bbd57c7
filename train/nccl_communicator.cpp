#include "train/nccl_communicator.hpp"

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <type_traits>

#include "core/error.hpp"
#include "kernels/side_stream.hpp"

namespace qopt {

namespace {

// The few NCCL declarations used here, as nccl.h (2.10 and later) declares them: the library is
// opened at run time, so no NCCL header or link step is needed to build.
using NcclComm = struct ncclComm*;
struct NcclUniqueId {
    char internal[128];
};
using NcclResult = int;  // ncclSuccess = 0
constexpr int kNcclFloat32 = 7;
constexpr int kNcclAvg = 4;  // NCCL 2.10+

struct NcclLibrary {
    void* handle = nullptr;
    std::string problem;
    NcclResult (*get_version)(int*) = nullptr;
    NcclResult (*get_unique_id)(NcclUniqueId*) = nullptr;
    NcclResult (*comm_init_rank)(NcclComm*, int, NcclUniqueId, int) = nullptr;
    NcclResult (*comm_destroy)(NcclComm) = nullptr;
    NcclResult (*comm_abort)(NcclComm) = nullptr;
    NcclResult (*all_reduce)(const void*, void*, size_t, int, int, NcclComm, cudaStream_t) = nullptr;
    NcclResult (*broadcast)(const void*, void*, size_t, int, int, NcclComm, cudaStream_t) = nullptr;
    NcclResult (*group_start)() = nullptr;
    NcclResult (*group_end)() = nullptr;
    const char* (*error_string)(NcclResult) = nullptr;
    int version = 0;
};

const NcclLibrary& nccl() {
    static NcclLibrary library;
    static std::once_flag loaded;
    std::call_once(loaded, [] {
        NcclLibrary& l = library;
        for (const char* name : {"libnccl.so.2", "libnccl.so"})
            if ((l.handle = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
        if (!l.handle) {
            l.problem = "NCCL (libnccl.so.2) was not found: install it, or add its folder to LD_LIBRARY_PATH";
            return;
        }
        bool complete = true;
        auto bind = [&](auto& fn, const char* symbol) {
            fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(l.handle, symbol));
            complete = complete && fn;
        };
        bind(l.get_version, "ncclGetVersion");
        bind(l.get_unique_id, "ncclGetUniqueId");
        bind(l.comm_init_rank, "ncclCommInitRank");
        bind(l.comm_destroy, "ncclCommDestroy");
        bind(l.comm_abort, "ncclCommAbort");
        bind(l.all_reduce, "ncclAllReduce");
        bind(l.broadcast, "ncclBroadcast");
        bind(l.group_start, "ncclGroupStart");
        bind(l.group_end, "ncclGroupEnd");
        bind(l.error_string, "ncclGetErrorString");
        if (!complete) {
            l.problem = "the NCCL library found lacks functions qopt calls; it is not NCCL 2.10 or later";
            return;
        }
        l.get_version(&l.version);
        // Versions from 2.9 on are major * 10000 + minor * 100 + patch.
        if (l.version < 21000) l.problem = "NCCL " + std::to_string(l.version) + " is older than 2.10";
    });
    return library;
}

void nccl_check(NcclResult result, const char* what) {
    if (result != 0) fail("NCCL ", what, " failed: ", nccl().error_string(result));
}

class NcclCommunicator final : public Communicator, public DeviceCollectives {
public:
    explicit NcclCommunicator(Communicator& host) : host_(host) {
        const std::string problem = nccl_unavailable_reason();
        if (!problem.empty()) fail("--collectives nccl: ", problem);
        setenv("NCCL_NVLS_ENABLE", "0", 0);  // the shared GPU machines require multicast off
        // Rank 0's unique id to every rank, as 32 floats' worth of bytes through the host group.
        NcclUniqueId id{};
        if (host.is_root()) nccl_check(nccl().get_unique_id(&id), "ncclGetUniqueId");
        static_assert(sizeof id % sizeof(float) == 0);
        float carrier[sizeof id / sizeof(float)];
        std::memcpy(carrier, &id, sizeof id);
        std::vector<std::vector<ParamRange>> from_root(size_t(host.world_size()));
        from_root[0].push_back({0, sizeof id / sizeof(float)});
        host.share_ranges(carrier, from_root);
        std::memcpy(&id, carrier, sizeof id);
        nccl_check(nccl().comm_init_rank(&comm_, host.world_size(), id, host.rank()), "ncclCommInitRank");
    }
    ~NcclCommunicator() override {
        if (!comm_) return;
        // After an error the other ranks may never join a collective again: abort rather than
        // wait for them (the side stream, synchronized as it goes, then finds its work ended).
        // Otherwise the side stream's reductions finish first.
        if (std::uncaught_exceptions() > 0) {
            nccl().comm_abort(comm_);
        } else {
            side_.reset();
            nccl().comm_destroy(comm_);
        }
    }

    int rank() const override { return host_.rank(); }
    int world_size() const override { return host_.world_size(); }
    std::string describe() const override {
        const int v = nccl().version;
        return "NCCL " + std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." +
               std::to_string(v % 100) + " between the GPUs; " + host_.describe();
    }
    DeviceCollectives* device_collectives() override { return this; }

    // Host operations: the host group's.
    void all_reduce_mean(float* values, size_t count) override { host_.all_reduce_mean(values, count); }
    void all_reduce_sum(double* values, size_t count) override { host_.all_reduce_sum(values, count); }
    void share_ranges(float* values, const std::vector<std::vector<ParamRange>>& ranges_by_rank) override {
        host_.share_ranges(values, ranges_by_rank);
    }
    std::vector<std::string> gather_to_root(const std::string& bytes) override { return host_.gather_to_root(bytes); }
    void barrier() override { host_.barrier(); }

    // Device operations: NCCL, on the default stream (where the model and optimizer run).
    void all_reduce_mean_on_device(float* device_values, size_t count) override {
        nccl_check(nccl().all_reduce(device_values, device_values, count, kNcclFloat32, kNcclAvg, comm_, 0),
                   "ncclAllReduce");
    }
    // On a stream of their own, behind the default stream's work so far. Every reduction of the
    // communicator goes through that one stream, so NCCL sees them in the order the ranks issue
    // them; the default stream's collectives come after a join.
    void all_reduce_mean_beside_default_stream(float* device_values, size_t count) override {
        if (!side_) side_ = std::make_unique<SideStream>();
        nccl_check(nccl().all_reduce(device_values, device_values, count, kNcclFloat32, kNcclAvg, comm_,
                                     side_->after_default_stream()),
                   "ncclAllReduce");
    }
    void join_reductions() override {
        if (side_) side_->join_into_default_stream();
    }
    // Every owner's ranges broadcast from it, grouped so that NCCL runs them as few launches (a
    // group holds at most 2048 operations in NCCL's documented limit; kGroupOperations per group).
    void share_ranges_on_device(float* device_values,
                                const std::vector<std::vector<ParamRange>>& ranges_by_rank) override {
        check_ranges_by_rank(ranges_by_rank);
        constexpr int kGroupOperations = 1024;
        int in_group = 0;
        for (int owner = 0; owner < world_size(); ++owner)
            for (const ParamRange& range : ranges_by_rank[size_t(owner)]) {
                if (in_group == 0) nccl_check(nccl().group_start(), "ncclGroupStart");
                nccl_check(nccl().broadcast(device_values + range.offset, device_values + range.offset, range.count,
                                            kNcclFloat32, owner, comm_, 0),
                           "ncclBroadcast");
                if (++in_group == kGroupOperations) {
                    nccl_check(nccl().group_end(), "ncclGroupEnd");
                    in_group = 0;
                }
            }
        if (in_group > 0) nccl_check(nccl().group_end(), "ncclGroupEnd");
    }

private:
    Communicator& host_;
    NcclComm comm_ = nullptr;
    std::unique_ptr<SideStream> side_;  // overlapped reductions (created on the first)
};

}  // namespace

std::string nccl_unavailable_reason() { return nccl().problem; }

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& host) {
    return std::make_unique<NcclCommunicator>(host);
}

}  // namespace qopt
