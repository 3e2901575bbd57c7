// How an fp32 matrix product's inputs reach the multipliers (the preconditioned optimizers'
// --precond-precision): full fp32 on CUDA cores, or rounded inside the GEMM to TF32 (10-bit
// mantissa) or bf16 (7-bit mantissa) on tensor cores; fp32 accumulation and result in every
// case. Plain C++, no CUDA headers: the optimizer configuration carries it.
#pragma once

namespace qopt {

enum class ProductPrecision { Fp32, Tf32, Bf16 };

inline const char* product_precision_name(ProductPrecision precision) {
    switch (precision) {
        case ProductPrecision::Tf32: return "tf32";
        case ProductPrecision::Bf16: return "bf16";
        case ProductPrecision::Fp32: break;
    }
    return "fp32";
}

}  // namespace qopt
