// A stream beside the default one, for work that must follow what the default stream has
// enqueued so far but may run while the default stream goes on (data-parallel training reduces
// each block's gradients on it while the backward pass computes the blocks below).
#pragma once
#include <cuda_runtime.h>

namespace qopt {

class SideStream {
public:
    SideStream();  // a non-blocking stream (no implicit syncs with stream 0) on the current GPU
    ~SideStream();
    SideStream(const SideStream&) = delete;
    SideStream& operator=(const SideStream&) = delete;

    // The side stream, made to wait first for everything enqueued on the default stream so far.
    cudaStream_t after_default_stream();
    // The default stream's later work waits for everything enqueued on the side stream so far.
    void join_into_default_stream();

private:
    cudaStream_t stream_ = nullptr;
    // One event each way, recorded again for every wait: a wait takes the record before it.
    cudaEvent_t default_reached_ = nullptr, side_reached_ = nullptr;
};

}  // namespace qopt
