// Small elementwise operations, CPU references: the residual add (the reference side of the
// GPU norms' fused adds) and the fp32 -> bf16 cast of master weights (round to nearest, ties
// to even, as __float2bfloat16).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace qopt {

template <typename T>
void add_cpu(T* out, const T* a, const T* b, size_t n) {
    for (size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// bf16 bits of x: the top 16 bits of the fp32 pattern after round-to-nearest-even (NaN kept quiet).
inline uint16_t to_bf16_bits_cpu(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu)) return uint16_t((bits >> 16) | 0x40u);
    const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
    return uint16_t((bits + rounding) >> 16);
}

}  // namespace qopt
