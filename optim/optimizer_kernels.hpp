// GPU kernels of the optimizer steps (optim/optimizer_kernels.cu); the CPU references are the
// per-method functions in this folder (adamw.hpp, muon.hpp, scion.hpp). All take fp32 master
// weights, fp32 gradients (multiplied by grad_scale on the fly, which folds in clipping) and
// fp32 state, and write the bf16 compute copy of every weight they update.
#pragma once
#include <cstdint>

#include "kernels/gpu.hpp"

namespace qopt {

// AdamW over a list of chunks of at most kAdamwChunk elements: chunk c covers
// params[p, p + n) with state m/v[s, s + n), decay on or off; chunks = 3 int64 per chunk:
// {p, s, n | decay << 32}. One launch updates every tensor routed to AdamW.
constexpr int kAdamwChunk = 8192;
void adamw_chunks_gpu(float* params, const float* grads, float* m, float* v, bf16* params_bf16,
                      const int64_t* chunks, int n_chunks, float lr, float beta1, float beta2, float eps,
                      float weight_decay, long step, float grad_scale, cudaStream_t stream = 0);

// Newton-Schulz input for a group of `count` matrices of n elements each (matrix b at
// params/grads + offsets[b], momentum and x at b * n):
//   m = m_keep m + g_weight g,   u = u_grad g + u_momentum m,   x = bf16(u) / (||bf16(u)||_F + 1e-7)
// partials: scratch of count * kNsPartials floats (no need to clear it).
constexpr int kNsPartials = 64;
void ns_prepare_gpu(bf16* x, float* momentum, float* partials, const float* grads, const int64_t* offsets, int count,
                    int64_t n, float grad_scale, float m_keep, float g_weight, float u_grad, float u_momentum,
                    cudaStream_t stream = 0);
// Newton-Schulz's quintic iteration on `count` bf16 matrices X [rows, cols] (x: count x rows x
// cols, contiguous), `steps` times, as batched bf16 GEMMs (one call per product for the group):
//   A = X X^T  (X^T X when rows > cols: the small square, s = min(rows, cols)),
//   X <- a X + (b A + c A A) X   (X <- a X + X (b A + c A A) when rows > cols).
// x2: scratch of x's size; a_scratch, p_scratch: count x s x s each. Returns x or x2, whichever
// holds the result. CPU reference: newton_schulz_cpu (optim/muon.hpp), one matrix at a time.
bf16* newton_schulz_batched_gpu(bf16* x, bf16* x2, bf16* a_scratch, bf16* p_scratch, int count, int rows, int cols,
                                int steps, float a, float b, float c, cudaStream_t stream = 0);
// The three products of one of its iterations (bench times them one by one):
//   gram:         a_out = X X^T, or X^T X when rows > cols   (count x s x s)
//   polynomial:   p_out = b A + c A A                         (count x s x s)
//   product back: x2 = a X + P X, or a X + X P when rows > cols
void newton_schulz_gram_gpu(bf16* a_out, const bf16* x, int count, int rows, int cols, cudaStream_t stream = 0);
void newton_schulz_polynomial_gpu(bf16* p_out, const bf16* a_in, int count, int s, float b, float c,
                                  cudaStream_t stream = 0);
void newton_schulz_product_back_gpu(bf16* x2, const bf16* x, const bf16* p, int count, int rows, int cols, float a,
                                    cudaStream_t stream = 0);
// W = keep W - step_scale o for each matrix of the group (o: count x n bf16, contiguous).
void matrix_apply_gpu(float* params, bf16* params_bf16, const bf16* o, const int64_t* offsets, int count, int64_t n,
                      float keep, float step_scale, cudaStream_t stream = 0);

// Scion's element-wise LMOs, one block per row task; tasks = 4 int64 per row:
// {param offset, momentum offset, cols | mode << 32, scale bits | decay << 32} with mode
// 0 sign (d = sign(m) / cols), 1 rms (d = m / (sqrt(mean m^2) + 1e-8): ColNorm rows and
// BiasRMS vectors), 2 rownorm (d = m / (||m|| sqrt(cols) + 1e-8)).
//   m = (1 - a) m + a g,  W = keep W - lr scale d  (keep: 1 - lr constrained, else 1 - lr wd)
void scion_rows_gpu(float* params, const float* grads, float* momentum, bf16* params_bf16, const int64_t* tasks,
                    int n_tasks, float lr, float momentum_weight, bool unconstrained, float weight_decay,
                    float grad_scale, cudaStream_t stream = 0);

}  // namespace qopt
