// A reduction over a thread block in a fixed order, so that reruns give the same bits: warp
// shuffles, then thread 0 combines the warps' results in warp order. Every thread gets the
// result; every thread of the block must call it (it synchronises). Blocks of at most 1024
// threads, a multiple of 32.
#pragma once
#include <cuda_runtime.h>

namespace qopt {

// The combiners. Min and max propagate NaN whatever the order of the operands (a plain
// a < b ? a : b keeps a NaN only where it comes second), so a reduction over values holding a
// NaN gives NaN for every block shape and thread count.
struct Add {
    template <typename T>
    __device__ T operator()(T a, T b) const { return a + b; }
};
struct Min {
    template <typename T>
    __device__ T operator()(T a, T b) const { return a < b || a != a ? a : b; }
};
struct Max {
    template <typename T>
    __device__ T operator()(T a, T b) const { return a > b || a != a ? a : b; }
};

template <typename T, typename Combine>
__device__ T block_reduce(T value, Combine combine) {
    __shared__ T warp_results[32];
    __shared__ T result;
    for (int o = 16; o > 0; o >>= 1) value = combine(value, __shfl_xor_sync(0xffffffffu, value, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // the last call's readers of `result` are past it
    if (lane == 0) warp_results[warp] = value;
    __syncthreads();
    if (threadIdx.x == 0) {
        T total = warp_results[0];
        for (int w = 1; w < int(blockDim.x + 31) / 32; ++w) total = combine(total, warp_results[w]);
        result = total;
    }
    __syncthreads();
    return result;
}

}  // namespace qopt
