#include "eval/model_source.hpp"

#include <set>

#include "core/error.hpp"
#include "core/files.hpp"
#include "core/safetensors.hpp"
#include "model/params.hpp"
#include "quant/packed_checkpoint.hpp"
#include "train/checkpoint.hpp"

namespace qopt {

namespace {

std::string string_or(const Json& object, const char* key, const std::string& fallback) {
    return object.is_object() && object.contains(key) && object.at(key).is_string() ? object.at(key).as_string()
                                                                                   : fallback;
}

EvalCheckpoint load_quantized_file(const std::string& path) {
    const SafetensorsFile file = SafetensorsFile::load(path);
    EvalCheckpoint out;
    out.quantized_file = true;
    const auto& meta = file.metadata();
    QOPT_CHECK(meta.count("qopt_config") && meta.count("qopt_quant"), path,
               ": not a qopt quantized checkpoint (metadata qopt_config / qopt_quant missing)");
    try {
        out.config = ModelConfig::from_json(Json::parse(meta.at("qopt_config")));
        out.quant = LinearQuantConfig::from_json(Json::parse(meta.at("qopt_quant")));
        if (meta.count("qopt_source")) {
            const Json source = Json::parse(meta.at("qopt_source"));
            out.preset = string_or(source, "preset", "?");
            out.optimizer = string_or(source, "optimizer", "?");
            out.trained_qat = string_or(source, "trained_qat", "off");
            if (source.contains("step")) out.step = long(source.at("step").as_int("step"));
            if (source.contains("seq_len")) out.train_seq_len = int(source.at("seq_len").as_int("seq_len"));
        }
    } catch (const Error& e) {
        fail(path, ": ", e.what());
    }
    out.quant.weights_offline = true;
    out.quant.validate(out.config.d_model, out.config.d_ff);
    const ParamLayout layout = ParamLayout::build(out.config);
    out.params.assign(layout.total, 0.0f);
    std::set<size_t> linear_offsets;
    for (const LinearMatrix& m : linear_matrices(out.config, layout)) {
        linear_offsets.insert(m.offset);
        const ParamTensor& tensor = *layout.find(m.name);
        if (file.has(m.name)) {  // stored in full precision (e.g. W16 formats)
            const std::vector<float> w = file.f32(m.name, tensor.shape);
            std::copy(w.begin(), w.end(), out.params.begin() + long(m.offset));
            continue;
        }
        QuantizedTensor q;
        q.rows = m.rows, q.cols = m.cols, q.spec = out.quant.weights;
        const int64_t packed_cols = q.spec.bits > 4 ? q.cols : (q.cols + 1) / 2;
        q.codes = unpack_codes(file.u8(m.name + ".qweight", {q.rows, packed_cols}), q.rows, q.cols, q.spec.bits);
        const int64_t groups = q.spec.granularity == Granularity::Tensor
                                   ? 1
                                   : int64_t(q.rows) * q.cols / q.spec.group_cols(q.cols);
        const std::vector<float> steps = file.f32(m.name + ".step", {groups});
        const std::vector<float> offsets = file.f32(m.name + ".offset", {groups});
        for (int64_t g = 0; g < groups; ++g) {
            GroupGrid grid;
            grid.step = steps[size_t(g)], grid.offset = offsets[size_t(g)];
            q.grids.push_back(grid);
        }
        const std::vector<float> w = q.dequantize();
        std::copy(w.begin(), w.end(), out.params.begin() + long(m.offset));
        out.quantized.push_back(std::move(q));
    }
    for (const auto& t : layout.tensors) {
        if (linear_offsets.count(t.offset)) continue;
        const std::vector<float> values = file.f32(t.name, t.shape);
        std::copy(values.begin(), values.end(), out.params.begin() + long(t.offset));
    }
    return out;
}

}  // namespace

std::string EvalCheckpoint::describe() const {
    std::string text = preset + ", " + optimizer + (step >= 0 ? ", step " + std::to_string(step) : std::string());
    if (trained_qat != "off") text += ", trained with QAT " + trained_qat;
    if (quantized_file) text += "; quantized file " + quant.describe(false);
    return text;
}

Json EvalCheckpoint::row_header(const std::string& path) const {
    const ParamLayout layout = ParamLayout::build(config);
    Json row = Json::object();
    row["time"] = utc_timestamp();
    row["checkpoint"] = path;
    row["model"] = preset;
    row["arch"] = arch_name(config.arch);
    row["parameters"] = uint64_t(layout.total);
    row["non_embedding_parameters"] = uint64_t(non_embedding_parameters(config, layout));
    row["optimizer"] = optimizer;
    row["step"] = int64_t(step);
    row["trained_qat"] = trained_qat;
    return row;
}

int EvalCheckpoint::seq_len_or(int requested) const {
    QOPT_CHECK(requested >= 0, "--seq-len must be non-negative, got ", requested);
    const int seq_len = requested ? requested : (train_seq_len ? train_seq_len : config.max_seq_len);
    QOPT_CHECK(seq_len <= config.max_seq_len, "--seq-len ", seq_len, " exceeds the model's max_seq_len ",
               config.max_seq_len);
    return seq_len;
}

EvalCheckpoint load_eval_checkpoint(const std::string& path) {
    QOPT_CHECK(!path.empty(), "--checkpoint is required");
    if (!is_directory(path)) {
        QOPT_CHECK(file_exists(path), path, ": no such checkpoint directory or file");
        return load_quantized_file(path);
    }
    const Checkpoint ckpt = read_checkpoint(path, /*with_optimizer_state=*/false);
    EvalCheckpoint out;
    out.config = ckpt.config;
    out.params = ckpt.params;
    out.optimizer = ckpt.optimizer.optimizer;
    out.step = ckpt.state.step;
    out.preset = string_or(ckpt.run, "preset", "?");
    if (ckpt.run.is_object() && ckpt.run.contains("qat")) {
        out.quant = LinearQuantConfig::from_json(ckpt.run.at("qat"));
        out.trained_qat = out.quant.short_name();
    }
    if (ckpt.run.is_object() && ckpt.run.contains("seq_len")) out.train_seq_len = int(ckpt.run.at("seq_len").as_int());
    return out;
}

}  // namespace qopt
