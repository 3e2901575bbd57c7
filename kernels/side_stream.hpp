// A stream beside another one, for work that must follow what that stream has enqueued so far
// but may run while it goes on (data-parallel training reduces each block's gradients on it while
// the backward pass computes the blocks below; attention's backward computes dQ on it beside dK
// and dV; the optimizers run shape groups and eigendecompositions on such streams).
#pragma once
#include <cuda_runtime.h>

namespace qopt {

class SideStream {
public:
    SideStream();  // a non-blocking stream (no implicit syncs with stream 0) on the current GPU
    ~SideStream();
    SideStream(const SideStream&) = delete;
    SideStream& operator=(const SideStream&) = delete;

    // The side stream, made to wait first for everything enqueued on `origin` so far.
    cudaStream_t after(cudaStream_t origin);
    cudaStream_t after_default_stream() { return after(0); }
    // `target`'s later work waits for everything enqueued on the side stream so far.
    void join_into(cudaStream_t target);
    void join_into_default_stream() { join_into(0); }
    // The stream itself, with no ordering added (for handles bound to it, and synchronising).
    cudaStream_t stream() const { return stream_; }

private:
    cudaStream_t stream_ = nullptr;
    // One event each way, recorded again for every wait: a wait takes the record before it.
    cudaEvent_t origin_reached_ = nullptr, side_reached_ = nullptr;
};

}  // namespace qopt
