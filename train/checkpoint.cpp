#include "train/checkpoint.hpp"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "core/error.hpp"
#include "core/files.hpp"
#include "core/safetensors.hpp"

namespace qopt {

static const char* kModelFile = "model.safetensors";
static const char* kOptimizerFile = "optimizer.safetensors";
static const char* kStateFile = "state.json";
static const int kFormatVersion = 1;

std::string checkpoint_name(long step) {
    char name[32];
    std::snprintf(name, sizeof name, "step_%08ld", step);
    return name;
}

std::string checkpoints_root(const std::string& out_dir) { return out_dir + "/checkpoints"; }

std::string write_checkpoint(const std::string& out_dir, const Checkpoint& ckpt) {
    const ParamLayout layout = ParamLayout::build(ckpt.config);
    QOPT_CHECK(ckpt.params.size() == layout.total, "checkpoint parameters do not match the model layout");
    const std::string root = checkpoints_root(out_dir);
    make_directories(root);
    const std::string final_dir = root + "/" + checkpoint_name(ckpt.state.step);
    const std::string temp_dir = final_dir + ".tmp." + std::to_string(::getpid());
    remove_all(temp_dir);
    make_directories(temp_dir);
    try {
        std::vector<TensorView> weights, optimizer_tensors;
        for (const auto& t : layout.tensors) weights.push_back({t.name, t.shape, ckpt.params.data() + t.offset});
        for (const auto& t : ckpt.optimizer.tensors) optimizer_tensors.push_back({t.name, t.shape, t.values.data()});
        const std::string model_bytes =
            safetensors_serialize(weights, {{"format", "pt"}, {"qopt_config", ckpt.config.to_json().dump()}});
        const std::string optimizer_bytes =
            safetensors_serialize(optimizer_tensors, {{"format", "pt"}, {"qopt_optimizer", ckpt.optimizer.optimizer}});
        write_file_atomic(temp_dir + "/" + kModelFile, model_bytes);
        write_file_atomic(temp_dir + "/" + kOptimizerFile, optimizer_bytes);

        Json state = Json::object();
        state["format_version"] = kFormatVersion;
        state["step"] = int64_t(ckpt.state.step);
        state["tokens_seen"] = ckpt.state.tokens_seen;
        state["skipped_steps"] = int64_t(ckpt.state.skipped_steps);
        state["loss_spikes"] = int64_t(ckpt.state.loss_spikes);
        state["loss_average"] = ckpt.state.loss_average;
        state["loss_average_count"] = int64_t(ckpt.state.loss_average_count);
        Json data = Json::object();
        data["shard_index"] = ckpt.state.train_position.shard_index;
        data["token_offset"] = ckpt.state.train_position.token_offset;
        data["epoch"] = ckpt.state.train_position.epoch;
        state["train_data_position"] = data;
        Json rng = Json::array();
        for (uint64_t word : ckpt.state.rng_state) rng.push_back(Json(word));
        state["rng_state"] = rng;
        state["optimizer"] = ckpt.optimizer.optimizer;
        state["optimizer_step"] = int64_t(ckpt.optimizer.step);
        state["optimizer_extra"] = ckpt.optimizer.extra;
        state["config"] = ckpt.config.to_json();
        state["run"] = ckpt.run;
        Json sums = Json::object();
        sums[kModelFile] = hex64(checksum64(model_bytes.data(), model_bytes.size()));
        sums[kOptimizerFile] = hex64(checksum64(optimizer_bytes.data(), optimizer_bytes.size()));
        state["checksums"] = sums;
        write_file_atomic(temp_dir + "/" + kStateFile, state.dump() + "\n");
    } catch (...) {
        remove_all(temp_dir);
        throw;
    }
    // Swap into place: an older checkpoint of the same step is moved aside first and removed
    // only after the new one has its final name.
    const std::string old_dir = final_dir + ".old." + std::to_string(::getpid());
    const bool replacing = is_directory(final_dir);
    if (replacing && std::rename(final_dir.c_str(), old_dir.c_str()) != 0)
        fail(final_dir, ": cannot move the previous checkpoint aside");
    if (std::rename(temp_dir.c_str(), final_dir.c_str()) != 0) {
        if (replacing) std::rename(old_dir.c_str(), final_dir.c_str());
        remove_all(temp_dir);
        fail(final_dir, ": cannot rename the new checkpoint into place");
    }
    if (replacing) remove_all(old_dir);
    return final_dir;
}

Checkpoint parse_checkpoint_state(const std::string& text, const std::string& state_path,
                                  std::map<std::string, std::string>* checksums) {
    Checkpoint ckpt;
    Json state;
    try {
        state = Json::parse(text);
    } catch (const Error& e) {
        fail(state_path, ": unreadable checkpoint state: ", e.what());
    }
    try {
        const int64_t version = state.at("format_version").as_int("format_version");
        if (version != kFormatVersion) fail("format_version ", version, " (this build reads ", kFormatVersion, ")");
        ckpt.config = ModelConfig::from_json(state.at("config"));
        ckpt.state.step = long(state.at("step").as_int("step"));
        ckpt.state.tokens_seen = state.at("tokens_seen").as_uint("tokens_seen");
        ckpt.state.skipped_steps = long(state.at("skipped_steps").as_int("skipped_steps"));
        if (state.contains("loss_average")) {  // absent in checkpoints from before the spike check
            ckpt.state.loss_spikes = long(state.at("loss_spikes").as_int("loss_spikes"));
            ckpt.state.loss_average = state.at("loss_average").as_double("loss_average");
            ckpt.state.loss_average_count = long(state.at("loss_average_count").as_int("loss_average_count"));
        }
        const Json& data = state.at("train_data_position");
        ckpt.state.train_position.shard_index = data.at("shard_index").as_uint("shard_index");
        ckpt.state.train_position.token_offset = data.at("token_offset").as_uint("token_offset");
        ckpt.state.train_position.epoch = data.at("epoch").as_uint("epoch");
        const Json& rng = state.at("rng_state");
        if (!rng.is_array() || rng.size() != 4) fail("rng_state must hold 4 words");
        for (size_t i = 0; i < 4; ++i) ckpt.state.rng_state[i] = rng[i].as_uint("rng_state");
        ckpt.optimizer.step = long(state.at("optimizer_step").as_int("optimizer_step"));
        // Checkpoints from before the optimizer choice existed hold AdamW's state.
        ckpt.optimizer.optimizer = state.contains("optimizer") ? state.at("optimizer").as_string("optimizer") : "adamw";
        if (state.contains("optimizer_extra")) ckpt.optimizer.extra = state.at("optimizer_extra");
        ckpt.run = state.at("run");
        for (const char* file : {kModelFile, kOptimizerFile}) {
            const std::string sum = state.at("checksums").at(file).as_string("checksum");
            if (checksums) (*checksums)[file] = sum;
        }
    } catch (const Error& e) {
        fail(state_path, ": ", e.what());
    }
    return ckpt;
}

Checkpoint read_checkpoint(const std::string& directory, bool with_optimizer_state) {
    if (!is_directory(directory)) fail(directory, ": no such checkpoint directory");
    const std::string state_path = directory + "/" + kStateFile;
    std::map<std::string, std::string> checksums;
    Checkpoint ckpt = parse_checkpoint_state(read_file(state_path), state_path, &checksums);
    const ParamLayout layout = ParamLayout::build(ckpt.config);
    auto load_verified = [&](const char* file) {
        const std::string path = directory + "/" + file;
        std::string bytes = read_file(path);
        const std::string& expected = checksums.at(file);
        const std::string actual = hex64(checksum64(bytes.data(), bytes.size()));
        if (actual != expected)
            fail(path, ": checksum mismatch (file damaged or truncated: ", actual, " vs ", expected, ")");
        return SafetensorsFile::parse(std::move(bytes), path);
    };
    const SafetensorsFile model = load_verified(kModelFile);
    // Sized from the file's own tensors before the buffer is: a state.json whose config does not
    // match its model file is refused, not allocated for.
    uint64_t stored = 0;
    for (const std::string& name : model.names()) {
        uint64_t numel = 1;
        for (int64_t d : model.shape(name)) numel *= uint64_t(d);
        stored += numel;
    }
    if (stored < layout.total)
        fail(directory, "/", kModelFile, ": holds ", stored, " values, fewer than the ", layout.total,
             " parameters of the model its state.json describes");
    ckpt.params.resize(layout.total);
    for (const auto& t : layout.tensors) {
        const std::vector<float> values = model.f32(t.name, t.shape);
        std::copy(values.begin(), values.end(), ckpt.params.begin() + long(t.offset));
    }
    if (!with_optimizer_state) return ckpt;
    const SafetensorsFile optimizer = load_verified(kOptimizerFile);
    for (const std::string& name : optimizer.names()) {
        StateTensor tensor;
        tensor.name = name;
        tensor.shape = optimizer.shape(name);
        tensor.values = optimizer.f32(name, tensor.shape);
        ckpt.optimizer.tensors.push_back(std::move(tensor));
    }
    return ckpt;
}

std::vector<std::string> list_checkpoints(const std::string& out_dir) {
    const std::string root = checkpoints_root(out_dir);
    std::vector<std::pair<long, std::string>> found;
    for (const auto& name : list_directory(root)) {
        long step = -1;
        char tail = 0;
        if (name.size() == 13 && std::sscanf(name.c_str(), "step_%8ld%c", &step, &tail) == 1 && step >= 0)
            found.emplace_back(step, root + "/" + name);
    }
    std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    std::vector<std::string> paths;
    for (auto& f : found) paths.push_back(f.second);
    return paths;
}

std::string latest_valid_checkpoint(const std::string& out_dir, std::ostream& log) {
    for (const auto& path : list_checkpoints(out_dir)) {
        try {
            read_checkpoint(path);
            return path;
        } catch (const Error& e) {
            log << "warning: skipping damaged checkpoint: " << e.what() << "\n";
        }
    }
    return "";
}

void prune_checkpoints(const std::string& out_dir, int keep) {
    if (keep <= 0) return;
    const auto paths = list_checkpoints(out_dir);
    for (size_t i = size_t(keep); i < paths.size(); ++i) remove_all(paths[i]);
}

std::vector<std::string> recover_interrupted_writes(const std::string& out_dir) {
    std::vector<std::string> actions;
    const std::string root = checkpoints_root(out_dir);
    for (const auto& name : list_directory(root)) {
        // step_<8 digits>.<tmp|old>.<pid>
        long step = -1, pid = -1;
        char kind[4] = {};
        int used = 0;
        if (std::sscanf(name.c_str(), "step_%8ld.%3[a-z].%ld%n", &step, kind, &pid, &used) != 3 ||
            size_t(used) != name.size() || pid <= 0)
            continue;
        const std::string kind_name = kind;
        if (kind_name != "tmp" && kind_name != "old") continue;
        if (pid != long(::getpid()) && ::kill(pid_t(pid), 0) == 0) continue;  // its writer still runs
        const std::string path = root + "/" + name, final_dir = root + "/" + checkpoint_name(step);
        if (kind_name == "old" && !is_directory(final_dir) && std::rename(path.c_str(), final_dir.c_str()) == 0) {
            actions.push_back("restored " + final_dir + " from an interrupted replacement");
            continue;
        }
        remove_all(path);
        actions.push_back("removed " + path + (kind_name == "tmp" ? " (a checkpoint write that never finished)"
                                                                  : " (superseded by a complete checkpoint)"));
    }
    return actions;
}

}  // namespace qopt
