// Fuzz targets for the parsers that read files a user hands qopt: token shards, safetensors
// (checkpoints, packed PTQ models), checkpoint state.json, the tokenizer's vocabulary files,
// JSON itself, and a data-parallel rank's optimizer state as another rank receives it. Each feeds arbitrary bytes to one parser; a qopt::Error (a clear refusal) is
// the expected outcome for bad input, anything else (a crash, a sanitizer report, another
// exception) is a bug. Built two ways: with libFuzzer + ASan/UBSan by `make fuzz`
// (tests/fuzz/libfuzzer_main.cpp), and into the test binary, which replays the kept corpus
// (tests/fuzz/corpus/<target>/) as regression tests.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qopt::fuzz {

void shard(const uint8_t* data, size_t size);
void safetensors(const uint8_t* data, size_t size);
void checkpoint_state(const uint8_t* data, size_t size);
void tokenizer(const uint8_t* data, size_t size);  // encoder.json, a NUL byte, vocab.bpe
void rank_state(const uint8_t* data, size_t size);  // optim/optimizer_state.hpp's parse_state
void json(const uint8_t* data, size_t size);

struct Target {
    const char* name;
    void (*run)(const uint8_t*, size_t);
};
const std::vector<Target>& targets();

}  // namespace qopt::fuzz
