// Shared test utilities: fresh random inputs, error norms, temp folders, synthetic shards,
// and where to find the built binaries and the default data (set by `make test`).
#pragma once
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/files.hpp"
#include "data/shard.hpp"
#include "model/config.hpp"

namespace qopt::test {

// A seed that differs per run (fresh inputs every time), printed on failure via INFO.
// QOPT_TEST_SEED=<seed> in the environment makes every call return that seed instead, to
// replay a logged failure.
inline uint64_t fresh_seed() {
    if (const char* replay = std::getenv("QOPT_TEST_SEED")) return std::strtoull(replay, nullptr, 10);
    static std::random_device device;
    return (uint64_t(device()) << 32) ^ device();
}

template <typename T>
std::vector<T> random_vector(size_t n, std::mt19937_64& gen, double scale = 1.0) {
    std::normal_distribution<double> normal(0.0, scale);
    std::vector<T> v(n);
    for (auto& x : v) x = T(normal(gen));
    return v;
}

// n integer codes uniform on -magnitude .. magnitude (a symmetric quantization grid's codes).
inline std::vector<int8_t> random_codes(size_t n, int magnitude, std::mt19937_64& gen) {
    std::vector<int8_t> codes(n);
    for (int8_t& c : codes) c = int8_t(int(gen() % uint64_t(2 * magnitude + 1)) - magnitude);
    return codes;
}

// n token ids uniform in [0, vocab).
inline std::vector<int> random_tokens(size_t n, int vocab, std::mt19937_64& gen) {
    std::vector<int> tokens(n);
    for (auto& t : tokens) t = int(gen() % uint64_t(vocab));
    return tokens;
}

// ||a - b|| / ||b||
template <typename A, typename B>
double relative_error(const std::vector<A>& a, const std::vector<B>& b) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        diff += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
        norm += double(b[i]) * double(b[i]);
    }
    return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-300);
}

struct TempDir {
    std::string path;
    TempDir() {
        char pattern[] = "/tmp/qopt_test_XXXXXX";
        path = ::mkdtemp(pattern);
    }
    ~TempDir() { remove_all(path); }
    std::string operator/(const std::string& name) const { return path + "/" + name; }
};

inline std::string env_or(const char* name, const char* fallback) {
    const char* value = std::getenv(name);
    return value && *value ? value : fallback;
}
inline std::string bin_dir() { return env_or("QOPT_BIN_DIR", "build/bin"); }
inline std::string bin(const char* name) { return bin_dir() + "/" + name; }
inline std::string data_dir() { return env_or("QOPT_DATA_DIR", "build/data"); }

// Runs a shell command; returns its exit status and fills `output` with stdout+stderr.
inline int run_command(const std::string& command, std::string& output) {
    output.clear();
    FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
    if (!pipe) return -1;
    char buffer[4096];
    size_t n;
    while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) output.append(buffer, n);
    int status = ::pclose(pipe);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// A learnable synthetic token stream: a fixed random "sentence" of 17 tokens (drawn from
// pattern_seed, so train and val streams can share it) repeated, with 10% of the tokens
// replaced by noise drawn from noise_seed. A tiny model's loss falls quickly and reliably.
inline std::vector<int> synthetic_tokens(size_t n, int vocab, uint64_t noise_seed, uint64_t pattern_seed = 7) {
    std::mt19937_64 pattern(pattern_seed), gen(noise_seed);
    std::vector<int> sentence(17);
    for (auto& t : sentence) t = int(pattern() % uint64_t(vocab));
    std::vector<int> tokens(n);
    for (size_t i = 0; i < n; ++i)
        tokens[i] = (gen() % 10 == 0) ? int(gen() % uint64_t(vocab)) : sentence[i % sentence.size()];
    return tokens;
}

// A preset with a 96-token vocabulary and a 64-token window: whole-model evaluation tests that
// score every vocabulary entry or run past the window stay small.
inline ModelConfig small_vocab_config(const char* preset) {
    ModelConfig config = preset_config(preset);
    config.vocab_size = 96;
    config.padded_vocab_size = 128;
    config.max_seq_len = 64;
    return config;
}

// A preset with a 40-token vocabulary (48 embedding rows) and 8 positions: models small enough for
// the optimizer and sharding tests to step every matrix many times.
inline ModelConfig small_model(const char* preset) {
    ModelConfig c = preset_config(preset);
    c.vocab_size = 40;
    c.padded_vocab_size = 48;
    c.max_seq_len = 8;
    return c;
}

}  // namespace qopt::test
