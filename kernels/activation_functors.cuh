// GELU (tanh form) and ReLU^2 as device functors, shared by the activation kernels
// (kernels/activations.cu) and the quantized backward that applies the derivative in the same
// pass (quant/quant_kernels.cu). Math and CPU reference: kernels/activations.hpp.
#pragma once

namespace qopt {

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)

// One formula per functor: forward ops read x, backward ops read (dout, x).
// The forward as x * sigmoid(2u), equal to x/2 (1 + tanh u): one hardware exp2 and a fast
// division (a few float ulps from tanhf's form, far below the bf16 output's rounding) instead
// of tanhf's ~20 instructions, which the fused quantization kernel (quant/quant_kernels.cu)
// pays per element. exp overflowing to inf gives -0 for very negative x, the limit.
struct GeluForward {
    __device__ float operator()(float x, float) const {
        const float u = kGeluK * (x + 0.044715f * x * x * x);
        return __fdividef(x, 1.0f + __expf(-2.0f * u));
    }
};
struct GeluBackward {
    __device__ float operator()(float dout, float x) const {
        const float t = tanhf(kGeluK * (x + 0.044715f * x * x * x));
        return dout * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kGeluK * (1.0f + 3.0f * 0.044715f * x * x));
    }
};
struct Relu2Forward {
    __device__ float operator()(float x, float) const {
        const float r = fmaxf(x, 0.0f);
        return r * r;
    }
};
struct Relu2Backward {
    __device__ float operator()(float dout, float x) const { return dout * 2.0f * fmaxf(x, 0.0f); }
};

}  // namespace qopt
