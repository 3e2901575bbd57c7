// Shared by the GPU tests: skipping without a GPU, bf16 inputs with their exact values, and
// device buffers that start poisoned (NaN bytes) or uploaded.
#pragma once
#include "helpers.hpp"
#include "kernels/device.hpp"
#include "kernels/gpu.hpp"

namespace qopt::test {

#define REQUIRE_GPU()                                                              \
    if (!gpu_available()) {                                                        \
        MESSAGE("skipped: " << query_cuda_device().problem << " (GPU test)");      \
        return;                                                                    \
    }

constexpr double kBf16Bound = 1e-2;

// Random bf16 values and the same values as double.
struct Bf16Input {
    std::vector<bf16> device_values;
    std::vector<double> exact;
};

inline Bf16Input random_bf16(size_t n, std::mt19937_64& gen, double scale = 1.0) {
    Bf16Input r;
    std::normal_distribution<double> normal(0.0, scale);
    for (size_t i = 0; i < n; ++i) {
        const bf16 b = __float2bfloat16(float(normal(gen)));
        r.device_values.push_back(b);
        r.exact.push_back(double(__bfloat162float(b)));
    }
    return r;
}

inline std::vector<double> to_double(const std::vector<bf16>& v) {
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = double(__bfloat162float(v[i]));
    return out;
}

// x rounded to the nearest bf16, as a float; and a vector of floats as bf16.
inline float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
inline std::vector<bf16> to_bf16(const std::vector<float>& x) {
    std::vector<bf16> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = __float2bfloat16_rn(x[i]);
    return out;
}

template <typename T>
DeviceBuffer<T> poisoned(size_t n) {
    DeviceBuffer<T> buffer(n);
    buffer.fill_bytes(0xFF);
    return buffer;
}

template <typename T>
DeviceBuffer<T> uploaded(const std::vector<T>& host) {
    DeviceBuffer<T> buffer(host.size());
    buffer.upload(host);
    return buffer;
}


}  // namespace qopt::test
