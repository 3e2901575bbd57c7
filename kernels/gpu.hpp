// Host-side API of the CUDA kernels: launchers callable from plain C++ (g++), so the model,
// the trainer and the tests need no nvcc. Activations are bf16, statistics and master
// weights fp32; every launcher checks its launch and throws qopt::Error on failure.
// Each family's CPU reference is the same-named *_cpu function in kernels/<family>.hpp.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qopt {

using bf16 = __nv_bfloat16;

bool gpu_available();

// A [B*T, ...] activation addressed by rows: row n starts at data + n * stride (elements), so a
// slice of a packed buffer (e.g. the keys inside [q | k | v] rows) needs no copy.
template <typename T>
struct Rows {
    T* data;
    int stride;
};  // a usable GPU is present (see kernels/device.hpp for the reason if not)

// Owning device allocation of `count` elements of T (no copy, move only).
template <typename T>
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t count) { resize(count); }
    ~DeviceBuffer() { release(); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& other) noexcept : data_(other.data_), count_(other.count_) {
        other.data_ = nullptr;
        other.count_ = 0;
    }
    void resize(size_t count);
    void release();
    T* data() { return data_; }
    const T* data() const { return data_; }
    size_t size() const { return count_; }
    void upload(const std::vector<T>& host);         // resizes to host.size()
    void upload_prefix(const std::vector<T>& host);  // into the first host.size() elements (no resize)
    std::vector<T> download() const;
    std::vector<T> download_prefix(size_t count) const;  // the first count elements
    void fill_bytes(unsigned char byte);  // e.g. 0xFF poisons bf16/fp32 with NaNs

private:
    T* data_ = nullptr;
    size_t count_ = 0;
};

// ---- norms (kernels/norms.cu)
// RMSNorm over rows of `dim`: out = w * x * rstd, rstd saved (fp32). Rows may be strided
// slices (QK-norm reads q and k inside the packed [q | k | v] rows).
void rmsnorm_forward_gpu(Rows<bf16> out, float* rstd, Rows<const bf16> in, const float* weight, int n_rows, int dim,
                         float eps, cudaStream_t stream = 0);
inline void rmsnorm_forward_gpu(bf16* out, float* rstd, const bf16* in, const float* weight, int n_rows, int dim,
                                float eps, cudaStream_t stream = 0) {
    rmsnorm_forward_gpu(Rows<bf16>{out, dim}, rstd, Rows<const bf16>{in, dim}, weight, n_rows, dim, eps, stream);
}
// din is written (not accumulated); dweight (fp32) is accumulated, deterministically.
void rmsnorm_backward_gpu(Rows<bf16> din, float* dweight, Rows<const bf16> dout, Rows<const bf16> in,
                          const float* weight, const float* rstd, int n_rows, int dim, cudaStream_t stream = 0);
inline void rmsnorm_backward_gpu(bf16* din, float* dweight, const bf16* dout, const bf16* in, const float* weight,
                                 const float* rstd, int n_rows, int dim, cudaStream_t stream = 0) {
    rmsnorm_backward_gpu(Rows<bf16>{din, dim}, dweight, Rows<const bf16>{dout, dim}, Rows<const bf16>{in, dim}, weight,
                         rstd, n_rows, dim, stream);
}
// Residual add fused with the norm (one pass instead of two):
//   out = residual + RMSNorm(in)          (olmo2: the normalised sublayer output joins the stream)
void rmsnorm_add_forward_gpu(bf16* out, float* rstd, const bf16* residual, const bf16* in, const float* weight,
                             int n_rows, int dim, float eps, cudaStream_t stream = 0);
void layernorm_forward_gpu(bf16* out, float* mean, float* rstd, const bf16* in, const float* weight, const float* bias,
                           int n_rows, int dim, float eps, cudaStream_t stream = 0);
//   sum = a + b, out = LayerNorm(sum)     (gpt2: the stream's new value and the next norm)
void add_layernorm_forward_gpu(bf16* sum, bf16* out, float* mean, float* rstd, const bf16* a, const bf16* b,
                               const float* weight, const float* bias, int n_rows, int dim, float eps,
                               cudaStream_t stream = 0);
// accumulate: din += (the residual stream's gradient gathers its branches in place).
// dbranch_bias (may be null) += column sums of the updated din: where din is the gradient of a
// residual stream that a biased linear layer's output was added into (gpt2's attention and MLP
// output projections), that bias's gradient, summed in the same pass.
void layernorm_backward_gpu(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                            const float* weight, const float* mean, const float* rstd, int n_rows, int dim,
                            bool accumulate = false, float* dbranch_bias = nullptr, cudaStream_t stream = 0);

// ---- activations (kernels/activations.cu): din is written, not accumulated.
void gelu_forward_gpu(bf16* out, const bf16* in, size_t n, cudaStream_t stream = 0);
void gelu_backward_gpu(bf16* din, const bf16* dout, const bf16* in, size_t n, cudaStream_t stream = 0);
void relu2_forward_gpu(bf16* out, const bf16* in, size_t n, cudaStream_t stream = 0);
void relu2_backward_gpu(bf16* din, const bf16* dout, const bf16* in, size_t n, cudaStream_t stream = 0);
// The MLP's activation named at run time (GPT-2: GELU, OLMo2: ReLU^2).
enum class MlpActivation { Gelu, Relu2 };
void activation_forward_gpu(bf16* out, const bf16* in, MlpActivation activation, size_t n, cudaStream_t stream = 0);
void activation_backward_gpu(bf16* din, const bf16* dout, const bf16* in, MlpActivation activation, size_t n,
                             cudaStream_t stream = 0);

// ---- RoPE and embeddings (kernels/rope_embedding.cu)
// cos/sin tables [seq_len, head_dim/2] from rope_angles (kernels/rope.hpp), uploaded once.
// The backward writes din (the inverse rotation of dout).
void rope_forward_gpu(bf16* out, const bf16* in, const float* cos_table, const float* sin_table, int n_rows,
                      int seq_len, int n_heads, int head_dim, cudaStream_t stream = 0);
void rope_backward_gpu(bf16* din, const bf16* dout, const float* cos_table, const float* sin_table, int n_rows,
                       int seq_len, int n_heads, int head_dim, cudaStream_t stream = 0);
// out[n] = embed[token[n]] + pos_embed[n % T] (pos_embed may be null).
void embedding_forward_gpu(bf16* out, const int* tokens, const bf16* embed, const bf16* pos_embed, int n_rows,
                           int seq_len, int dim, cudaStream_t stream = 0);
// The batch's positions grouped by token id (CSR, ascending positions): built on the host
// from the token ids, uploaded, and used by embedding_backward_gpu for a deterministic sum.
struct TokenBuckets {
    std::vector<int> tokens, offsets, positions;  // offsets has tokens.size() + 1 entries
};
TokenBuckets build_token_buckets(const int* tokens, int n_rows, int vocab_size);
// d_embed (fp32) += rows of dout per token; d_pos_embed (fp32, may be null) += per position.
void embedding_backward_gpu(float* d_embed, float* d_pos_embed, const bf16* dout, const int* bucket_tokens,
                            const int* bucket_offsets, const int* bucket_positions, int n_buckets, int n_rows,
                            int seq_len, int dim, cudaStream_t stream = 0);

// ---- linear layers (kernels/matmul.cu, cuBLASLt): weight [out_dim, in_dim] row-major, bf16.
// out = in W^T + bias (bias may be null).
void matmul_forward_gpu(bf16* out, const bf16* in, const bf16* weight, const bf16* bias, int n_rows, int in_dim,
                        int out_dim, cudaStream_t stream = 0);
// Fused MLP entry and exit for GELU layers (cuBLASLt epilogues; GELU is the tanh form):
//   out = gelu(in W^T + bias), pre_activation = in W^T + bias (saved for the backward pass)
void matmul_forward_gelu_gpu(bf16* out, bf16* pre_activation, const bf16* in, const bf16* weight, const bf16* bias,
                             int n_rows, int in_dim, int out_dim, cudaStream_t stream = 0);
//   d_pre_activation = (dout W) * gelu'(pre_activation)   (the next layer's input gradient,
//   W [out_dim, in_dim], through the GELU that produced its input)
void matmul_backward_input_dgelu_gpu(bf16* d_pre_activation, const bf16* dout, const bf16* weight,
                                     const bf16* pre_activation, int n_rows, int in_dim, int out_dim,
                                     cudaStream_t stream = 0);
// din = dout W (written; with accumulate, din += dout W).
void matmul_backward_input_gpu(bf16* din, const bf16* dout, const bf16* weight, int n_rows, int in_dim, int out_dim,
                               bool accumulate = false, cudaStream_t stream = 0);
// dweight (fp32) += dout^T in (written instead with accumulate false).
void matmul_backward_weight_gpu(float* dweight, const bf16* dout, const bf16* in, int n_rows, int in_dim, int out_dim,
                                bool accumulate = true, cudaStream_t stream = 0);
// dbias (fp32) += column sums of dout, deterministic (shares the norms' two-stage reduction
// in kernels/norms.cu).
void matmul_backward_bias_gpu(float* dbias, const bf16* dout, int n_rows, int out_dim, cudaStream_t stream = 0);

// out[n, o] = sum_i in[n, i] weight[o, i], int8 operands, exact int32 result (W8A8's integer
// product; sizes multiples of 4). CPU reference: int8_matmul_cpu in kernels/matmul.hpp.
void int8_matmul_gpu(int32_t* out, const int8_t* in, const int8_t* weight, int n_rows, int in_dim, int out_dim,
                     cudaStream_t stream = 0);
// The same product for codes of magnitude <= 15 held as e4m3 bytes (exact on fp8 tensor cores),
// with the scales in the GEMM's epilogue: out[n, o] = (sum_i in[n, i] weight[o, i]) *
// in_scales[n] * weight_scales[o] (+ bias[o], bf16 output only); out bf16, or fp32 with
// out_fp32. Sizes multiples of 16. CPU reference: int8_matmul_cpu on the integer codes, then
// the scales (quant/int8_linear.hpp: dequantize_product_cpu).
void fp8_scaled_matmul_gpu(void* out, bool out_fp32, const uint8_t* in, const uint8_t* weight, const float* in_scales,
                           const float* weight_scales, const bf16* bias, int n_rows, int in_dim, int out_dim,
                           cudaStream_t stream = 0);

// Batched row-major product for the optimizers (bf16 in and out, fp32 accumulation): for each
// of `batch` problems, D[m, n] = alpha op(A) op(B) + beta C, op(A) [m, k], op(B) [k, n]; the
// b-th problem's matrices start stride_* elements after the previous one's (C and D share
// stride_c; c may equal d, never a or b).
void batched_matmul_gpu(bf16* d, const bf16* c, const bf16* a, bool transpose_a, const bf16* b, bool transpose_b,
                        int m, int n, int k, float alpha, float beta, int batch, int64_t stride_a, int64_t stride_b,
                        int64_t stride_c, cudaStream_t stream = 0);
// The same with fp32 operands and result, the product in full fp32 or (tf32) on TF32 tensor
// cores: the preconditioners' factor statistics and rotations (Shampoo, SOAP, PSGD).
void batched_matmul_f32_gpu(float* d, const float* c, const float* a, bool transpose_a, const float* b,
                            bool transpose_b, int m, int n, int k, float alpha, float beta, int batch,
                            int64_t stride_a, int64_t stride_b, int64_t stride_c, bool tf32 = false,
                            cudaStream_t stream = 0);
// The same with leading dimensions (sub-matrices), D = alpha op(A) op(B) + beta D in place:
// row-major D [m, n] with rows ld_d apart, A [m, k] (stored [k, m] when transpose_a) with rows
// ld_a apart, B likewise; the b-th problem's matrices start stride_* elements after the previous
// one's. The blocked triangular products and GPTQ's lazy updates.
void strided_matmul_f32_gpu(float* d, int64_t ld_d, int64_t stride_d, const float* a, int64_t ld_a, int64_t stride_a,
                            bool transpose_a, const float* b, int64_t ld_b, int64_t stride_b, bool transpose_b, int m,
                            int n, int k, int batch, float alpha, float beta, bool tf32 = false,
                            cudaStream_t stream = 0);

// ---- dense linear algebra for the preconditioned optimizers (kernels/linalg.cu: cuSOLVER and
// cuBLAS; CPU references in optim/dense.hpp). `batch` row-major fp32 matrices back to back;
// scratch holds batch * n * n floats; results are ordered on the default stream.
// Symmetric a: values descending, column j of vectors [n, n] the unit eigenvector of values[j]
// (as symmetric_eigen; only the lower triangle of a is read). a may be scratch itself (then it
// is overwritten).
// With a stream other than the default, everything runs on that stream (ordered there, not on
// the default stream) with workspaces of its own: a side stream can decompose while the default
// stream trains (Shampoo's --shampoo-refresh-lag). cuSOLVER's batched syev holds the calling
// thread until the decomposition is done, so such a call belongs on a thread of its own.
void symmetric_eigen_batched_gpu(float* vectors, float* values, const float* a, int n, int batch, float* scratch,
                                 cudaStream_t stream = 0);
// The same for the listed matrices of the batch only (increasing indices), in one batched call
// over the list: their vectors and values land at their places in the batch; the other places of
// vectors and values are used as work (unspecified afterwards). a may be scratch itself.
void symmetric_eigen_listed_gpu(float* vectors, float* values, const float* a, int n, int batch,
                                const std::vector<int>& listed, float* scratch);
// (a + eps I)^(-1/root) for `batch` symmetric positive semi-definite n x n matrices by the
// coupled inverse Newton iteration (kernels/newton_root.cu; CPU reference and the iteration:
// coupled_newton_inverse_root in optim/dense.hpp), every product one batched fp32 GEMM (TF32
// with tf32). The whole batch iterates until every matrix is within the tolerance (a matrix
// already within it stays at its fixed point) or max_iterations. scratch: 5 batch n^2 floats.
struct NewtonBatchReport {
    int iterations = 0;  // steps taken by the batch
    int converged = 0;   // matrices within the tolerance at the end
};
NewtonBatchReport coupled_newton_inverse_root_batched_gpu(float* x, const float* a, int n, int batch, int root,
                                                          double eps, int max_iterations, double tolerance,
                                                          float* scratch, bool tf32 = false);
// The n x n orthogonal factor Q of a = Q R by Householder reflections (as householder_q; the
// signs of Q's columns follow LAPACK's convention, which the optimizers do not depend on).
void householder_q_batched_gpu(float* q, const float* a, int n, int batch, float* scratch);
// The same Q by Cholesky QR in float64 (shifted CholeskyQR3 on the unit-length columns: GEMMs,
// Cholesky factorizations and triangular solves over the whole batch, not latency-bound like
// Householder's one-matrix-at-a-time calls; a matrix takes only the passes it needs: none if its
// columns are already orthonormal, two for a well-conditioned input); its columns' signs make R's
// diagonal positive. A matrix whose Gram matrix is singular (a zero or dependent column) falls
// back to Householder. scratch: batch * n * n floats (the fallback's). Its own float64 work (16
// n^2 bytes per matrix, allocated at the first call and kept) is capped at scratch_limit_bytes:
// larger batches go through in chunks (at the 1 GiB default: 113 matrices of 768^2, 16 of 2048^2).
struct CholeskyQrReport {
    long matrices = 0;
    long passes = 0;                 // Cholesky passes taken, summed over the matrices (at most 3 each)
    long grams = 0;                  // Gram matrices X^T X formed, summed (a pass's, or a check that none is needed)
    long householder_fallbacks = 0;  // matrices left to Householder
};
constexpr size_t kCholeskyQrScratchLimit = size_t(1) << 30;
CholeskyQrReport cholesky_q_batched_gpu(float* q, const float* a, int n, int batch, float* scratch,
                                        size_t scratch_limit_bytes = kCholeskyQrScratchLimit);
// The reports of every cholesky_q_batched_gpu call so far, summed (bench takes the difference
// over its timed steps).
CholeskyQrReport cholesky_qr_totals();
// The Q factor of a = Q R for the optimizers: Cholesky QR up to 4096^2 (measured faster there),
// Householder above (kernels/linalg.cu). Column signs are unspecified.
void qr_q_batched_gpu(float* q, const float* a, int n, int batch, float* scratch);
// Allocate now the workspaces that symmetric_eigen_batched_gpu / qr_q_batched_gpu (and its
// Householder fallback) will need for these shapes: they are kept and shared by later calls, so
// an optimizer that reserves its refreshes' shapes at construction has them counted in the memory
// check before training, instead of allocating them at its first refresh. scratch as for the calls.
void reserve_symmetric_eigen_gpu(int n, int batch, float* scratch, cudaStream_t stream = 0);
// Frees the workspaces of symmetric_eigen_batched_gpu's calls on this (side) stream.
void release_side_solver(cudaStream_t stream);
// The cuBLASLt workspace of products issued on this stream (each stream has its own), now.
void reserve_matmul_workspace(cudaStream_t stream);
void reserve_qr_q_gpu(int n, int batch, float* scratch);
// Device bytes held now by this family's workspaces (cuSOLVER's, the Cholesky QR's, pointer arrays).
size_t linalg_workspace_bytes();
// FLOPs (2 per multiply-add) issued so far by the preconditioned optimizers' matrix products,
// counted on the host as each call is made: batched_matmul_f32_gpu, the blocked triangular
// products, the syrk Gram matrices, the triangular solves and the Cholesky QR's float64 Gram
// matrices and solves (and GPTQ's updates, which share strided_matmul_f32_gpu). cuSOLVER's
// eigendecompositions and Householder QRs are not counted (their flops depend on the algorithm).
// bench takes the difference over an optimizer step.
double issued_matrix_flops();
void count_matrix_flops(double flops);
// x [rows, n] <- x u^-1 for upper-triangular u [n, n] (as solve_upper_right).
void solve_upper_right_batched_gpu(float* x, const float* u, int rows, int n, int batch);
// x [n, cols] <- u^-T x for upper-triangular u [n, n].
void solve_upper_transposed_left_batched_gpu(float* x, const float* u, int n, int cols, int batch);
// Products with upper-triangular matrices (PSGD's factors and their multipliers) that skip their
// zero blocks: each u [n, n] must hold zeros below its diagonal (the diagonal blocks are read as
// dense). Cut into blocks of `block` (0: triangular_product_block(n)), one strided-batched GEMM
// (strided_matmul_f32_gpu, full fp32 or TF32) per row or column block of the result; outputs
// must not overlap the inputs. CPU reference: matmul. Measured on an H200 (bench --linalg, full fp32): twelve
// 3072^2 factors by 3072 x 768, 2.47 ms against a dense batched GEMM's 3.68 and cuBLAS trmm's
// 4.30 (one call per matrix); twelve 3072^2 upper-triangular products 4.69 ms against 14.1
// (GEMM) and 9.4 (trmm); 48 of 768^2 (blocks of 256) 0.72 and 0.51 ms against 0.95.
// The block size: 512 from 2048 (3072^2: 2.47 / 4.69 ms against 2.72 / 5.75 with 256), else 256
// (768^2: 0.72 / 0.51 ms against 0.76 / 0.59 with 512).
inline int triangular_product_block(int n) { return n >= 2048 ? 512 : 256; }
// out [n, cols] = op(u) b (op(u) = u^T when transpose_u), b [n, cols].
void upper_triangular_product_batched_gpu(float* out, const float* u, bool transpose_u, const float* b, int n,
                                          int cols, int batch, bool tf32 = false, int block = 0);
// out [rows, n] = b op(u), b [rows, n].
void product_with_upper_triangular_batched_gpu(float* out, const float* b, const float* u, bool transpose_u, int rows,
                                               int n, int batch, bool tf32 = false, int block = 0);
// out [n, n] = u q for upper-triangular u and q (zeros below both diagonals), itself upper
// triangular: one GEMM per block on or above the diagonal.
void upper_triangular_square_product_batched_gpu(float* out, const float* u, const float* q, int n, int batch,
                                                 bool tf32 = false, int block = 0);
// The share of a dense product's multiply-adds that the two kinds above do: ~(1 + block/n)/2
// for the side products, ~1/6 (1 + O(block/n)) for the square one (block 0 as above).
double upper_triangular_product_fraction(int n, int block = 0);
double upper_triangular_square_product_fraction(int n, int block = 0);
// d [n, n] = alpha op(a) op(a)^T + beta d for each of `batch` contiguous matrices, op(a) [n, k]
// (a stored [k, n] when transpose_a), d symmetric: one cublasSsyrk per matrix (half a GEMM's
// multiply-adds; cuBLAS has no batched syrk), then the computed triangle mirrored. Full fp32
// (CPU reference: matmul).
void symmetric_gram_batched_gpu(float* d, const float* a, bool transpose_a, int n, int k, int batch, float alpha,
                                float beta);
// The same by strided-batched GEMMs over the block rows of the upper triangle (blocks of `block`,
// 0: triangular_product_block(n)), then mirrored: batched over the matrices, unlike syrk, so it
// fills the GPU at 768^2 and 1024^2 too, with upper_triangular_product_fraction(n, block) of a
// GEMM's multiply-adds (the same block rows; 2/3 at 768 in blocks of 256); full fp32 or (tf32) TF32. H100, 96 matrices from
// k = 768: 768^2 1.40 ms against the batched GEMM's 1.83 (blocks of 128: 1.40, 512: 1.52);
// 1024^2 2.25 against 3.11; 12 of 3072^2 (blocks of 512) 2.59 against syrk's 2.55; in TF32
// slower than the TF32 GEMM (0.38 against 0.27 ms at 768^2).
void symmetric_gram_blocked_batched_gpu(float* d, const float* a, bool transpose_a, int n, int k, int batch,
                                        float alpha, float beta, bool tf32 = false, int block = 0);
// GPTQ's factor: symmetric positive definite h [n, n] (float64, row-major) is overwritten so
// that its upper triangle holds U with U^T U = h^-1 (the lower triangle is left undefined), as
// upper_cholesky_of_inverse in quant/gptq.hpp. Throws when h is not positive definite.
void upper_cholesky_of_inverse_gpu(double* h, int n);

// ---- elementwise helpers (kernels/elementwise.cu; CPU reference in kernels/elementwise.hpp)
// out = bf16(in), round to nearest even.
void to_bf16_gpu(bf16* out, const float* in, size_t n, cudaStream_t stream = 0);

// ---- causal flash attention (kernels/attention.cu); head_dim 16, 32, 64 or 128, any seq_len.
// Head h of row n is columns h*head_dim .. of that row. lse [B, H, T] (fp32) is saved for the
// backward pass, which needs delta [B, H, T] (fp32) as scratch and writes dq, dk, dv.
// Two kernel families compute the same thing: Hopper's (wgmma; builds for sm_90a on an sm_90
// GPU, head_dim 64 and 128) where available, else the portable ones (mma.sync, sm_80 up).
// `portable` forces the latter everywhere (tests and bench compare the two).
enum class AttentionKernels { automatic, portable };
void set_attention_kernels(AttentionKernels choice);
// Which family attention_*_gpu run for this head_dim on the current GPU, in words.
const char* attention_kernels_name(int head_dim);
void attention_forward_gpu(Rows<bf16> out, float* lse, Rows<const bf16> q, Rows<const bf16> k, Rows<const bf16> v,
                           int batch, int seq_len, int n_heads, int head_dim, cudaStream_t stream = 0);
void attention_backward_gpu(Rows<bf16> dq, Rows<bf16> dk, Rows<bf16> dv, float* delta, Rows<const bf16> dout,
                            Rows<const bf16> out, const float* lse, Rows<const bf16> q, Rows<const bf16> k,
                            Rows<const bf16> v, int batch, int seq_len, int n_heads, int head_dim,
                            cudaStream_t stream = 0);

// ---- classifier head and gradient norm (kernels/classifier.cu)
// logits: [n_rows, padded_vocab] bf16 from matmul_forward_gpu(x, embed); writes loss[n] and,
// when grad_scale != 0, overwrites the logits with dlogits (padded columns set to 0).
void softmax_cross_entropy_gpu(float* losses, bf16* logits, const int* targets, int n_rows, int vocab_size,
                               int padded_vocab_size, float grad_scale, cudaStream_t stream = 0);
// *norm = ||values||_2, summed in a fixed order (deterministic).
void global_norm_gpu(float* norm, const float* values, size_t n, cudaStream_t stream = 0);

}  // namespace qopt
