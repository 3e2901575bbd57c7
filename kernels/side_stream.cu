#include "kernels/side_stream.hpp"

#include "kernels/cuda_common.cuh"

namespace qopt {

SideStream::SideStream() {
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&origin_reached_, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&side_reached_, cudaEventDisableTiming));
}

SideStream::~SideStream() {
    // Nothing may still run on the stream when its buffers' owners go away.
    cudaStreamSynchronize(stream_);
    cudaEventDestroy(side_reached_);
    cudaEventDestroy(origin_reached_);
    cudaStreamDestroy(stream_);
}

cudaStream_t SideStream::after(cudaStream_t origin) {
    CUDA_CHECK(cudaEventRecord(origin_reached_, origin));
    CUDA_CHECK(cudaStreamWaitEvent(stream_, origin_reached_, 0));
    return stream_;
}

void SideStream::join_into(cudaStream_t target) {
    CUDA_CHECK(cudaEventRecord(side_reached_, stream_));
    CUDA_CHECK(cudaStreamWaitEvent(target, side_reached_, 0));
}

}  // namespace qopt
