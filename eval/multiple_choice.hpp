// Zero-shot multiple-choice scoring the way the LM Evaluation Harness does it: each choice is
// a continuation of the shared context; its score is the sum of the model's log-probabilities
// of the continuation's tokens given everything before them. acc takes the best sum; acc_norm
// divides each sum by the choice's length in characters (Unicode code points of the choice
// text without the leading delimiter, as the harness's len(choice)) first.
//
// Readers:
//  - HellaSwag's public JSONL (ctx_a, ctx_b, activity_label, endings, label), preprocessed as
//    the harness does (query "activity: ctx_a Ctx_b", " [title]" -> ". ", [bracketed] removed,
//    double spaces collapsed), continuation " " + ending;
//  - llm.c's HellaSwag .bin (dev/data/hellaswag.py: magic 20240522, uint16 examples of context
//    and completion tokens); lengths for acc_norm from the decoded completions when a tokenizer
//    is given, else token counts;
//  - a generic JSONL, one {"context": str, "choices": [str, ...], "label": int} per line (and an
//    optional "delimiter", default " "), for PIQA / ARC-like tasks converted by the user.
// Tokenization follows the harness: whole = encode(context + continuation), the continuation's
// tokens are whole[len(encode(context)):], a trailing space of the context moves to the
// continuation.
#pragma once
#include <string>
#include <vector>

namespace qopt {

class Tokenizer;
class EvalModel;

struct ChoiceExample {
    std::vector<int> context;
    std::vector<std::vector<int>> completions;
    std::vector<double> completion_lengths;  // acc_norm's divisors
    int label = 0;
};

std::vector<ChoiceExample> read_hellaswag_jsonl(const std::string& path, const Tokenizer& tokenizer, int limit = 0);
std::vector<ChoiceExample> read_choices_jsonl(const std::string& path, const Tokenizer& tokenizer, int limit = 0);
// tokenizer may be null (then acc_norm divides by token counts).
std::vector<ChoiceExample> read_llmc_eval_bin(const std::string& path, const Tokenizer* tokenizer, int limit = 0);
// format: "hellaswag" | "hellaswag-bin" | "choices"; "auto" picks by extension and content.
std::vector<ChoiceExample> read_choice_task(const std::string& path, const std::string& format,
                                            const Tokenizer* tokenizer, int limit = 0);

// The harness's text preprocessing for HellaSwag (exposed for tests).
std::string hellaswag_preprocess(const std::string& text);

struct ChoiceResult {
    int examples = 0;
    double acc = 0, acc_norm = 0;   // fractions in [0, 1]
    double acc_stderr = 0;          // sqrt(acc (1 - acc) / (n - 1)), as the harness reports
    std::vector<std::vector<double>> log_likelihoods;  // [example][choice]
};

// Log-likelihood of every completion. Rows are (context + completion), left-truncated to the
// model's max_seq_len + 1 tokens, packed `batch_size` rows per forward pass of one fixed length
// (the longest row, rounded up to a multiple of 64).
ChoiceResult score_choices(EvalModel& model, const std::vector<ChoiceExample>& examples, int batch_size);

// Turns per-choice log-likelihoods into acc / acc_norm (exposed for tests).
ChoiceResult choice_accuracy(const std::vector<ChoiceExample>& examples,
                             std::vector<std::vector<double>> log_likelihoods);

}  // namespace qopt
