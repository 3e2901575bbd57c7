// One interface to the six optimizers (--optimizer adamw|muon|scion|shampoo|soap|psgd), on the
// CPU (the references in this folder) and on the GPU (optim/gpu_optimizer.*).
//
// Routing, as each method's reference recommends (printed at the start of a run):
//   hidden matrices (q, k, v, attention out, MLP up and down; the fused qkv weight counts as
//   three matrices)                      -> the method itself (AdamW: AdamW)
//   Scion: embedding / tied head         -> Scion's Sign LMO (or --scion-embed-norm), scale 3000
//          norm gains and biases         -> Scion's BiasRMS LMO, scale --scion-vector-scale
//   every other method: embeddings, position embeddings, norm gains, biases -> AdamW
//   (SOAP's and PSGD's references would also precondition the embedding's d_model side and
//   run Adam on 1-D tensors; qopt keeps the study's question - the hidden linear layers - to
//   the method and the rest to one AdamW for all six.)
// Learning rates: --lr is the method's (each method has its reference's default), the AdamW
// that takes the other tensors runs at --adamw-lr (default 3e-4, or --lr itself for AdamW);
// the schedule multiplies both by the same factor. Weight decay: one --weight-decay for all,
// decoupled (W *= 1 - lr wd), on 2-D tensors only (Scion's constrained mode shrinks W by its
// own rule instead).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "model/params.hpp"
#include "optim/adamw.hpp"
#include "optim/muon.hpp"
#include "optim/optimizer_state.hpp"
#include "optim/psgd.hpp"
#include "optim/scion.hpp"
#include "optim/shampoo.hpp"
#include "optim/soap.hpp"

namespace qopt {

enum class OptimizerKind { AdamW, Muon, Scion, Shampoo, Soap, Psgd };
OptimizerKind parse_optimizer(const std::string& name);
const char* optimizer_name(OptimizerKind kind);
std::string optimizer_names();  // "adamw, muon, scion, shampoo, soap, psgd"

struct OptimizerConfig {
    OptimizerKind kind = OptimizerKind::AdamW;
    double lr = 0;        // the method's peak learning rate; 0: the method's reference default
    double adamw_lr = 0;  // peak learning rate of the AdamW for routed tensors; 0: 3e-4 (AdamW: lr)
    AdamWConfig adamw;    // betas/eps of that AdamW (and of AdamW itself); weight_decay is shared
    MuonConfig muon;
    ScionConfig scion;
    ShampooConfig shampoo;
    SoapConfig soap;
    PsgdConfig psgd;
    // GPU only: Shampoo's, SOAP's and PSGD's fp32 products on TF32 tensor cores (10-bit
    // mantissa inputs, fp32 accumulation) instead of full fp32; off by default, as the references.
    bool precond_tf32 = false;

    double method_lr() const;      // lr, or the method's default
    double aux_adamw_lr() const;   // adamw_lr, or its default
    double weight_decay() const { return adamw.weight_decay; }
    void validate() const;
    Json to_json() const;  // the method's settings, for run records
};

// A matrix the method updates: `rows` x `cols` starting at `offset` in the flat buffer.
struct MatrixSlot {
    std::string name;  // "layers.0.attn.qkv.weight.q"
    size_t offset;
    int rows, cols;
};

// A tensor updated by AdamW, or by one of Scion's element-wise LMO rules.
struct TensorSlot {
    std::string name;
    size_t offset, numel;
    std::vector<int64_t> shape;  // the parameter's own shape (state tensors have it too)
    int rows, cols;              // 2-D view (1-D: rows 1)
    bool decay;           // gets weight decay
    ScionNorm scion_norm;  // Scion only
    double scion_scale;    // Scion only
};

struct Routing {
    std::vector<MatrixSlot> matrices;  // the method's own (Muon/Scion spectral, Shampoo, SOAP, PSGD)
    std::vector<TensorSlot> adamw;     // AdamW
    std::vector<TensorSlot> scion;     // Scion's element-wise LMOs (embedding, vectors)
    std::string describe() const;      // one line per group, for the run log
};
// Which slots of a Routing an optimizer updates and keeps state for: all of them in a single
// process; one rank's share under ZeRO-1 (optim/shard_plan.hpp), where an AdamW tensor, or a
// Scion tensor whose rule treats rows apart (scion_rows_separable), may be owned by rows.
struct RowRange {
    int begin = 0, end = 0;  // [begin, end) of the slot's 2-D view; empty: not owned
    int count() const { return end - begin; }
};
struct OwnedSlots {
    std::vector<RowRange> adamw, scion;  // element-wise slots: owned rows
    std::vector<bool> matrices;
    static OwnedSlots all(const Routing& routing);
};
// A contiguous range of the flat parameter buffer.
struct ParamRange {
    size_t offset, count;
};
// Where `rows` of element-wise slot `slot` lie in the flat buffer (checked against its rows).
ParamRange owned_range(const TensorSlot& slot, const RowRange& rows);

// Sets config.kind from an --optimizer name and validates every setting.
void resolve_optimizer(const std::string& name, OptimizerConfig& config);

Routing route_parameters(const ParamLayout& layout, const OptimizerConfig& config);

// An optimizer over a model's flat fp32 parameter buffer.
class Optimizer {
public:
    virtual ~Optimizer() = default;
    // One step: step_count() += 1 first; lr is the method's scheduled learning rate (the
    // routed AdamW gets lr * adamw_lr / method_lr); grads are multiplied by grad_scale.
    virtual void step(float* params, float* grads, double lr, double grad_scale) = 0;
    virtual long step_count() const = 0;
    virtual OptimizerState state() const = 0;
    virtual void load_state(const OptimizerState& state) = 0;
    virtual size_t state_bytes() const = 0;
    // Preconditioner matrices (Shampoo roots, SOAP bases, PSGD factors) computed non-finite and
    // not taken since this object was made: the last good ones were kept (commit_preconditioner).
    virtual long rejected_preconditioners() const { return 0; }
    // Shampoo with a kept eigenbasis and eigh: factor refreshes that kept it, and that decomposed.
    virtual EigenRefreshCounts eigen_refreshes() const { return {}; }
};

// `owned` (none: every slot) limits the optimizer to one rank's share: it keeps state for, and
// steps, only those slots and rows (indices, and so PSGD's probes, stay those of the whole
// routing); its state() holds only their tensors (row parts with their row_begin), and
// load_state() takes whole tensors (a merged state) and keeps its own part of them.
std::unique_ptr<Optimizer> make_cpu_optimizer(const ParamLayout& layout, const OptimizerConfig& config,
                                              const OwnedSlots* owned = nullptr);

}  // namespace qopt
