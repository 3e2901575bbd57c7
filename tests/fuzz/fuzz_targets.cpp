#include "tests/fuzz/fuzz_targets.hpp"

#include <cstring>

#include "core/error.hpp"
#include "core/json.hpp"
#include "core/safetensors.hpp"
#include "data/shard.hpp"
#include "data/tokenizer.hpp"
#include "optim/optimizer_state.hpp"
#include "train/checkpoint.hpp"

namespace qopt::fuzz {

namespace {

std::string bytes_of(const uint8_t* data, size_t size) { return std::string(reinterpret_cast<const char*>(data), size); }

// Runs `parse`; a qopt::Error is a refusal, which is fine.
template <typename Parse>
void refusal_allowed(Parse parse) {
    try {
        parse();
    } catch (const Error&) {
    }
}

}  // namespace

void shard(const uint8_t* data, size_t size) {
    refusal_allowed([&] {
        const auto tokens = parse_shard(bytes_of(data, size), 50257, "fuzz.bin");
        volatile uint16_t sink = tokens.empty() ? 0 : tokens.back();
        (void)sink;
    });
}

// Every accessor a reader uses, on every tensor the header declares.
void safetensors(const uint8_t* data, size_t size) {
    refusal_allowed([&] {
        const SafetensorsFile file = SafetensorsFile::parse(bytes_of(data, size), "fuzz.safetensors");
        for (const auto& [key, value] : file.metadata()) (void)key, (void)value;
        for (const std::string& name : file.names()) {
            const std::vector<int64_t> shape = file.shape(name);
            refusal_allowed([&] { file.f32(name, shape); });
            refusal_allowed([&] { file.u8(name, shape); });
            refusal_allowed([&] { file.f32(name, {1}); });
        }
    });
}

void checkpoint_state(const uint8_t* data, size_t size) {
    refusal_allowed([&] {
        std::map<std::string, std::string> checksums;
        const Checkpoint ckpt = parse_checkpoint_state(bytes_of(data, size), "fuzz/state.json", &checksums);
        ParamLayout::build(ckpt.config);  // a config that passed validation must lay out
    });
}

void tokenizer(const uint8_t* data, size_t size) {
    const std::string text = bytes_of(data, size);
    const size_t split = text.find('\0');
    const std::string encoder = text.substr(0, split), merges = split == std::string::npos ? "" : text.substr(split + 1);
    refusal_allowed([&] {
        const Tokenizer tok = Tokenizer::parse(encoder, merges, "fuzz/encoder.json", "fuzz/vocab.bpe");
        const std::vector<int> ids = tok.encode("Hello world, it's 2026!\n\xff\xfe caf\xc3\xa9");
        tok.decode(ids);
    });
}

// A rank's optimizer state as another rank receives it (data parallelism's gather).
void rank_state(const uint8_t* data, size_t size) {
    refusal_allowed([&] {
        const OptimizerState state = parse_state(bytes_of(data, size), "fuzz rank state");
        parse_state(serialize_state(state), "fuzz rank state, written back");  // what it writes, it reads back
    });
}

void json(const uint8_t* data, size_t size) {
    refusal_allowed([&] {
        const Json value = Json::parse(bytes_of(data, size));
        Json::parse(value.dump());  // what it writes, it reads back
    });
}

const std::vector<Target>& targets() {
    static const std::vector<Target> all = {{"shard", shard},
                                            {"safetensors", safetensors},
                                            {"checkpoint_state", checkpoint_state},
                                            {"tokenizer", tokenizer},
                                            {"rank_state", rank_state},
                                            {"json", json}};
    return all;
}

}  // namespace qopt::fuzz
