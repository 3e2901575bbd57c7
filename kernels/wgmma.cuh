// Hopper warpgroup MMA (wgmma.mma_async; needs sm_90a): the 4 warps of a warpgroup compute a
// 64 x N product together, B (and optionally A) read straight from shared memory by the tensor
// cores, without ldmatrix through registers. Used by the Hopper attention kernels
// (kernels/attention_wgmma.cu) and the W8A8 GEMM (quant/int8_scaled_gemm.cu: int8 operands, a
// 128-byte row holding 128 of them); compiled only where __CUDA_ARCH_FEAT_SM90_ALL is defined.
//
// Register layouts (PTX ISA, wgmma .m64nNk16) match mma.sync m16n8k16 per warp: warp w of the
// warpgroup holds rows 16w .. 16w+15; an accumulator d[N/8][4] holds, in lane l, d[i][0..1] =
// row 16w + l/4, columns 8i + 2(l%4) (+1), and d[i][2..3] the same columns of row +8; an A
// fragment a[4] is laid out as mma.sync's (kernels/mma.cuh), so C fragments of scores turn into
// A fragments of probabilities exactly as in the portable kernels.
//
// Shared-memory operands: a tile of R rows x 64 bf16 ("panel", 128 bytes per row, 1024-byte
// aligned) whose 16-byte chunks are XOR-swizzled by the row: chunk c of row r sits at byte
// r*128 + 16*(c ^ r%8) (the hardware's 128-byte swizzle; bank-conflict free for cp.async writes
// and for the tensor cores' reads). A tile of R x 128 is two panels one after another.
//  - K-major operand (the 64 columns are the contraction): k-step ks reads columns 16ks ..
//    16ks+15: start address + 32 ks bytes; rows 8 apart are 1024 bytes apart (stride offset).
//  - MN-major operand (the rows are the contraction, columns are N): k-step ks reads rows
//    16ks .. 16ks+15: start address + 2048 ks bytes; stride offset 1024 (8 rows), leading
//    offset = bytes of one panel (the next 64 columns of N).
#pragma once
#include <cstdint>
#include <type_traits>

#include "kernels/mma.cuh"

namespace qopt {

// Dynamic shared memory, its start rounded up to 1024 bytes (swizzled panels must be).
template <typename T>
__device__ __forceinline__ T* aligned_shared(unsigned char* bytes) {
    const uint32_t misalignment = shared_address(bytes) % 1024;
    return reinterpret_cast<T*>(bytes + (misalignment ? 1024 - misalignment : 0));
}

// Element offset of (row, 8-column chunk) within a swizzled panel.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) { return row * 64 + ((chunk ^ (row & 7)) << 3); }

// Matrix descriptor (PTX ISA "matrix descriptor format"): start address, leading and stride
// byte offsets, each >> 4, in bits 0-13, 16-29, 32-45; 128-byte swizzle (mode 1) in bits 62-63.
__device__ __forceinline__ uint64_t wgmma_descriptor(const void* start, uint32_t leading_bytes, uint32_t stride_bytes) {
    return uint64_t((shared_address(start) & 0x3FFFF) >> 4) | (uint64_t((leading_bytes >> 4) & 0x3FFF) << 16) |
           (uint64_t((stride_bytes >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// Descriptors of a swizzled tile (its first panel at `tile`) read as a K-major operand, or as
// an MN-major one whose panels hold panel_rows rows each.
__device__ __forceinline__ uint64_t k_major_tile(const void* tile) { return wgmma_descriptor(tile, 16, 1024); }
__device__ __forceinline__ uint64_t mn_major_tile(const bf16* tile, int panel_rows) {
    return wgmma_descriptor(tile, uint32_t(panel_rows) * 128, 1024);
}

// A descriptor moved `bytes` further into shared memory (the start address is its low bits and
// never carries out of them: shared memory ends below 2^18 bytes). Kernels build their tiles'
// descriptors once and move them by constants, instead of rebuilding them per product.
__device__ __forceinline__ uint64_t advance(uint64_t descriptor, uint32_t bytes) { return descriptor + (bytes >> 4); }

// k-step ks of a K-major tile of panel_rows rows: columns 16 ks .. 16 ks + 15.
__device__ __forceinline__ uint64_t k_major_step(uint64_t tile, int panel_rows, int ks) {
    return advance(tile, uint32_t((ks / 4) * panel_rows * 128 + (ks % 4) * 32));
}

// k-step ks of an MN-major tile: rows 16 ks .. 16 ks + 15.
__device__ __forceinline__ uint64_t mn_major_step(uint64_t tile, int ks) { return advance(tile, uint32_t(ks) * 2048); }

// Register writes before a wgmma (accumulators, A fragments) must be fenced off from it.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most `pending` committed groups are in flight.
template <int pending>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(pending) : "memory");
}

// An empty asm that "modifies" a register: the compiler may neither read it earlier nor keep a
// stale copy.
template <typename T>
__device__ __forceinline__ void pin_register(T& value) {
    if constexpr (std::is_same_v<T, float>) asm volatile("" : "+f"(value)::"memory");
    else asm volatile("" : "+r"(value)::"memory");
}

// After wgmma_wait: keeps the compiler from reading accumulators (fp32 or int32) before the wait.
template <int N, typename T>
__device__ __forceinline__ void wgmma_pin(T d[][4]) {
#pragma unroll
    for (int i = 0; i < N / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) pin_register(d[i][e]);
}

// Same for A fragments read from registers by an in-flight wgmma: pinned after the wait, they
// stay allocated (and unchanged) until the tensor cores are done with them.
template <int K>
__device__ __forceinline__ void wgmma_pin_fragments(uint32_t a[][4]) {
#pragma unroll
    for (int i = 0; i < K / 16; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) pin_register(a[i][e]);
}

// generic proxy writes to shared memory (cp.async, st.shared) -> visible to wgmma's reads.
__device__ __forceinline__ void fence_shared_for_wgmma() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define QOPT_D4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])

// d (64 x 64) = A (64 x 16, shared, K-major) * B (16 x 64, shared, K-major) (+ d if accumulate).
__device__ __forceinline__ void wgmma_ss_n64(float d[8][4], uint64_t a_descriptor, uint64_t b_descriptor,
                                             int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : QOPT_D4(0), QOPT_D4(1), QOPT_D4(2), QOPT_D4(3), QOPT_D4(4), QOPT_D4(5), QOPT_D4(6), QOPT_D4(7)
        : "l"(a_descriptor), "l"(b_descriptor), "r"(accumulate));
}

// d (64 x 64) = A (64 x 16, bf16 fragments in registers) * B (16 x 64, shared, MN-major) (+ d
// if accumulate).
__device__ __forceinline__ void wgmma_rs_n64(float d[8][4], const uint32_t a[4], uint64_t b_descriptor,
                                              int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : QOPT_D4(0), QOPT_D4(1), QOPT_D4(2), QOPT_D4(3),
          QOPT_D4(4), QOPT_D4(5), QOPT_D4(6), QOPT_D4(7)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_descriptor), "r"(accumulate));
}

// d (64 x 128) = A (64 x 16, bf16 fragments in registers) * B (16 x 128, shared, MN-major) (+ d
// if accumulate).
__device__ __forceinline__ void wgmma_rs_n128(float d[16][4], const uint32_t a[4], uint64_t b_descriptor,
                                              int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : QOPT_D4(0), QOPT_D4(1), QOPT_D4(2), QOPT_D4(3),
          QOPT_D4(4), QOPT_D4(5), QOPT_D4(6), QOPT_D4(7),
          QOPT_D4(8), QOPT_D4(9), QOPT_D4(10), QOPT_D4(11),
          QOPT_D4(12), QOPT_D4(13), QOPT_D4(14), QOPT_D4(15)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_descriptor), "r"(accumulate));
}

#undef QOPT_D4

#define QOPT_R4(i) "+r"(d[i][0]), "+r"(d[i][1]), "+r"(d[i][2]), "+r"(d[i][3])

// d (64 x 256, int32) = A (64 x 32 int8, shared, K-major) * B (32 x 256 int8, shared, K-major)
// (+ d if accumulate). Exact integer arithmetic; 8-bit operands must both be K-major, and a
// k-step of 32 int8 is the same 32 bytes as a bf16 k-step of 16 (k_major_step applies).
__device__ __forceinline__ void wgmma_ss_s8_n256(int32_t d[32][4], uint64_t a_descriptor, uint64_t b_descriptor,
                                                 int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p;\n}\n"
        :
          QOPT_R4(0), QOPT_R4(1), QOPT_R4(2), QOPT_R4(3), QOPT_R4(4), QOPT_R4(5), QOPT_R4(6), QOPT_R4(7),
          QOPT_R4(8), QOPT_R4(9), QOPT_R4(10), QOPT_R4(11), QOPT_R4(12), QOPT_R4(13), QOPT_R4(14), QOPT_R4(15),
          QOPT_R4(16), QOPT_R4(17), QOPT_R4(18), QOPT_R4(19), QOPT_R4(20), QOPT_R4(21), QOPT_R4(22), QOPT_R4(23),
          QOPT_R4(24), QOPT_R4(25), QOPT_R4(26), QOPT_R4(27), QOPT_R4(28), QOPT_R4(29), QOPT_R4(30), QOPT_R4(31)
        : "l"(a_descriptor), "l"(b_descriptor), "r"(accumulate));
}

#undef QOPT_R4

}  // namespace qopt
