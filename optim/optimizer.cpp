#include "optim/optimizer.hpp"

#include <map>
#include <sstream>

#include "core/error.hpp"

namespace qopt {

namespace {
const std::vector<std::pair<OptimizerKind, const char*>>& optimizer_table() {
    static const std::vector<std::pair<OptimizerKind, const char*>> table = {
        {OptimizerKind::AdamW, "adamw"}, {OptimizerKind::Muon, "muon"}, {OptimizerKind::Scion, "scion"},
        {OptimizerKind::Shampoo, "shampoo"}, {OptimizerKind::Soap, "soap"}, {OptimizerKind::Psgd, "psgd"}};
    return table;
}
}  // namespace

OptimizerKind parse_optimizer(const std::string& name) {
    for (const auto& [kind, text] : optimizer_table())
        if (name == text) return kind;
    fail("unknown --optimizer '", name, "' (known: ", optimizer_names(), ")");
}

const char* optimizer_name(OptimizerKind kind) {
    for (const auto& [k, text] : optimizer_table())
        if (k == kind) return text;
    return "?";
}

std::string optimizer_names() {
    std::string names;
    for (const auto& [kind, text] : optimizer_table()) names += (names.empty() ? "" : ", ") + std::string(text);
    return names;
}

double OptimizerConfig::method_lr() const {
    if (lr > 0) return lr;
    switch (kind) {
        case OptimizerKind::AdamW: return 1e-3;
        case OptimizerKind::Muon: return muon.lr;
        case OptimizerKind::Scion: return scion.lr;
        case OptimizerKind::Shampoo: return shampoo.lr;
        case OptimizerKind::Soap: return soap.lr;
        case OptimizerKind::Psgd: return psgd.lr;
    }
    return 1e-3;
}

double OptimizerConfig::aux_adamw_lr() const {
    if (kind == OptimizerKind::AdamW) return method_lr();
    return adamw_lr > 0 ? adamw_lr : 3e-4;
}

void OptimizerConfig::validate() const {
    QOPT_CHECK(lr >= 0, "--lr must be positive, got ", lr);
    QOPT_CHECK(adamw_lr >= 0, "--adamw-lr must be positive, got ", adamw_lr);
    adamw.validate();
    QOPT_CHECK(muon.momentum >= 0 && muon.momentum < 1, "--muon-momentum must be in [0, 1)");
    QOPT_CHECK(muon.ns_steps > 0, "--muon-ns-steps must be positive");
    scion.validate();
    shampoo.validate();
    soap.validate();
    psgd.validate();
}

Json OptimizerConfig::to_json() const {
    Json j = Json::object();
    j["name"] = std::string(optimizer_name(kind));
    j["lr"] = method_lr();
    j["adamw_lr"] = aux_adamw_lr();
    j["adamw"] = adamw.to_json();
    if (kind == OptimizerKind::Shampoo || kind == OptimizerKind::Soap || kind == OptimizerKind::Psgd)
        j["precond_tf32"] = precond_tf32;
    switch (kind) {
        case OptimizerKind::AdamW: break;
        case OptimizerKind::Muon: {
            Json m = Json::object();
            m["momentum"] = muon.momentum;
            m["nesterov"] = muon.nesterov;
            m["ns_steps"] = int64_t(muon.ns_steps);
            m["ns_coefficients"] = Json::array();
            m["ns_coefficients"].push_back(Json(muon.ns_a));
            m["ns_coefficients"].push_back(Json(muon.ns_b));
            m["ns_coefficients"].push_back(Json(muon.ns_c));
            j["muon"] = m;
            break;
        }
        case OptimizerKind::Scion: j["scion"] = scion.to_json(); break;
        case OptimizerKind::Shampoo: j["shampoo"] = shampoo.to_json(); break;
        case OptimizerKind::Soap: j["soap"] = soap.to_json(); break;
        case OptimizerKind::Psgd: j["psgd"] = psgd.to_json(); break;
    }
    return j;
}

void resolve_optimizer(const std::string& name, OptimizerConfig& config) {
    config.kind = parse_optimizer(name);
    config.validate();
}

Routing route_parameters(const ParamLayout& layout, const OptimizerConfig& config) {
    Routing routing;
    const bool adamw_only = config.kind == OptimizerKind::AdamW;
    for (const auto& t : layout.tensors) {
        const int rows = t.shape.size() == 2 ? int(t.shape[0]) : 1;
        const int cols = t.shape.size() == 2 ? int(t.shape[1]) : int(t.shape[0]);
        TensorSlot slot{t.name, t.offset, t.numel, t.shape, rows, cols, decays_by_default(t), ScionNorm::BiasRMS, 0.0};
        if (!adamw_only && t.kind == ParamKind::Matrix) {
            // The fused [3C, C] qkv weight is three C x C maps (q, k, v).
            const bool fused_qkv = t.name.find("attn.qkv.weight") != std::string::npos;
            if (fused_qkv) {
                const int part_rows = rows / 3;
                const char* parts[3] = {"q", "k", "v"};
                for (int p = 0; p < 3; ++p)
                    routing.matrices.push_back(
                        {t.name + "." + parts[p], t.offset + size_t(p) * part_rows * cols, part_rows, cols});
            } else {
                routing.matrices.push_back({t.name, t.offset, rows, cols});
            }
            continue;
        }
        if (config.kind == OptimizerKind::Scion) {
            const bool embedding = t.kind == ParamKind::Embedding || t.kind == ParamKind::Position;
            slot.scion_norm = embedding ? config.scion.embed_norm : ScionNorm::BiasRMS;
            slot.scion_scale = embedding ? config.scion.embed_scale : config.scion.vector_scale;
            routing.scion.push_back(slot);
            continue;
        }
        routing.adamw.push_back(slot);
    }
    return routing;
}

OwnedSlots OwnedSlots::all(const Routing& routing) {
    OwnedSlots owned;
    for (const TensorSlot& s : routing.adamw) owned.adamw.push_back({0, s.rows});
    for (const TensorSlot& s : routing.scion) owned.scion.push_back({0, s.rows});
    owned.matrices.assign(routing.matrices.size(), true);
    return owned;
}

ParamRange owned_range(const TensorSlot& slot, const RowRange& rows) {
    QOPT_CHECK(rows.begin >= 0 && rows.begin <= rows.end && rows.end <= slot.rows, "optimizer shard: rows ",
               rows.begin, "..", rows.end, " of ", slot.name, " are outside its ", slot.rows, " rows");
    return {slot.offset + size_t(rows.begin) * size_t(slot.cols), size_t(rows.count()) * size_t(slot.cols)};
}

std::string Routing::describe() const {
    std::ostringstream out;
    auto count = [](const auto& slots) {
        size_t n = 0;
        for (const auto& s : slots) n += size_t(s.rows) * s.cols;
        return n;
    };
    if (!matrices.empty()) {
        std::map<std::pair<int, int>, int> shapes;
        for (const auto& m : matrices) ++shapes[{m.rows, m.cols}];
        out << matrices.size() << " hidden matrices (" << count(matrices) << " values:";
        for (const auto& [shape, n] : shapes) out << " " << n << "x[" << shape.first << "," << shape.second << "]";
        out << ")";
    }
    if (!scion.empty()) {
        out << (out.tellp() > 0 ? "; " : "") << "Scion element-wise:";
        for (const auto& s : scion)
            if (s.rows > 1) out << " " << s.name << " " << scion_norm_name(s.scion_norm) << " x" << s.scion_scale;
        size_t vectors = 0;
        for (const auto& s : scion) vectors += s.rows == 1;
        if (vectors) out << ", " << vectors << " vectors biasrms";
    }
    if (!adamw.empty()) out << (out.tellp() > 0 ? "; " : "") << "AdamW: " << adamw.size() << " tensors (" << count(adamw) << " values)";
    return out.str();
}

}  // namespace qopt
