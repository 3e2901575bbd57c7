#include "kernels/side_stream.hpp"

#include "kernels/cuda_common.cuh"

namespace qopt {

SideStream::SideStream() {
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&default_reached_, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&side_reached_, cudaEventDisableTiming));
}

SideStream::~SideStream() {
    // Nothing may still run on the stream when its buffers' owners go away.
    cudaStreamSynchronize(stream_);
    cudaEventDestroy(side_reached_);
    cudaEventDestroy(default_reached_);
    cudaStreamDestroy(stream_);
}

cudaStream_t SideStream::after_default_stream() {
    CUDA_CHECK(cudaEventRecord(default_reached_, 0));
    CUDA_CHECK(cudaStreamWaitEvent(stream_, default_reached_, 0));
    return stream_;
}

void SideStream::join_into_default_stream() {
    CUDA_CHECK(cudaEventRecord(side_reached_, stream_));
    CUDA_CHECK(cudaStreamWaitEvent(0, side_reached_, 0));
}

}  // namespace qopt
