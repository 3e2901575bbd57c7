// Tensor-core building blocks shared by the hand-written GEMM-like kernels (flash attention,
// the packed-4-bit W4A16 product): ldmatrix, mma.sync m16n8k16 (bf16 in, fp32 accumulate) and
// cp.async. Fragment layouts (PTX ISA, mma.m16n8k16): lane l holds A[r][c] for r = l/4 (+8),
// c = 2(l%4) (+1, +8); B[k][n] for k = 2(l%4) (+1, +8), n = l/4; C[r][n] for r = l/4 (+8),
// n = 2(l%4) (+1).
#pragma once
#include <cstdint>

#include "kernels/gpu.hpp"

namespace qopt {

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t fragment[4], const bf16* pointer) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
                 : "r"(shared_address(pointer)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t fragment[4], const bf16* pointer) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
                 : "r"(shared_address(pointer)));
}

// c (16x8, fp32) += a (16x16, bf16) * b (16x8, bf16)
__device__ __forceinline__ void mma_16x8x16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<uint32_t*>(&pair);
}

// 16 bytes global -> shared, asynchronously; !valid writes zeros (the source is not read).
__device__ __forceinline__ void cp_async_16(void* shared_destination, const void* global_source, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared_destination)),
                 "l"(global_source), "r"(valid ? 16 : 0));
}

// 4 bytes global -> shared, asynchronously (through L1); !valid writes zeros.
__device__ __forceinline__ void cp_async_4(void* shared_destination, const void* global_source, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(shared_destination)),
                 "l"(global_source), "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `pending` committed groups are still in flight (0: all landed).
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
}

}  // namespace qopt
