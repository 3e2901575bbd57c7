// Text generation from a model: the next token from the logits of the last position,
// logits = E h (the tied head: h the final norm's output, E the embedding), chosen greedily
// (temperature 0) or sampled from softmax(logits / temperature) restricted to the top_k
// largest (top_k 0: all). No KV cache: each new token reruns the window (at most
// max_seq_len tokens, the oldest dropped) — a sanity check, not a serving path.
#pragma once
#include <cstdint>
#include <vector>

namespace qopt {

class EvalModel;
class Rng;

struct SampleOptions {
    double temperature = 0.0;  // 0: greedy
    int top_k = 0;             // 0: the whole vocabulary
};

struct GenerateOptions {
    int max_new_tokens = 64;
    SampleOptions sample;
    uint64_t seed = 1;
    int stop_token = -1;  // stop after emitting it (e.g. the tokenizer's end-of-text); -1: none
};

// The next token from one row of logits (size vocab_size). rng is used only when sampling.
int sample_token(const std::vector<float>& logits, const SampleOptions& options, Rng& rng);

// Appends up to max_new_tokens to prompt and returns only the new tokens. embed: the
// embedding matrix [vocab_size, d_model] (fp32, the checkpoint's).
std::vector<int> generate(EvalModel& model, const float* embed, const std::vector<int>& prompt,
                          const GenerateOptions& options);

}  // namespace qopt
