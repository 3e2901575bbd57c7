#include "eval/multiple_choice.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "core/error.hpp"
#include "core/files.hpp"
#include "core/json.hpp"
#include "data/tokenizer.hpp"
#include "eval/eval_model.hpp"

namespace qopt {

namespace {

size_t code_points(const std::string& text) {
    size_t n = 0;
    for (unsigned char c : text) n += (c & 0xC0) != 0x80;
    return n;
}

// Python's str.capitalize() for ASCII: first character upper, the rest lower (other bytes kept).
std::string capitalize(std::string text) {
    for (size_t i = 0; i < text.size(); ++i) {
        const unsigned char c = static_cast<unsigned char>(text[i]);
        if (c >= 0x80) continue;
        text[i] = char(i == 0 ? std::toupper(c) : std::tolower(c));
    }
    return text;
}

// The harness's _encode_pair: context and continuation tokens of (context, continuation).
void encode_pair(const Tokenizer& tokenizer, std::string context, std::string continuation,
                 std::vector<int>& context_tokens, std::vector<int>& continuation_tokens) {
    size_t spaces = 0;
    while (spaces < context.size() && context[context.size() - 1 - spaces] == ' ') ++spaces;
    if (spaces > 0) {
        continuation = context.substr(context.size() - spaces) + continuation;
        context.resize(context.size() - spaces);
    }
    const std::vector<int> whole = tokenizer.encode(context + continuation);
    context_tokens = tokenizer.encode(context);
    QOPT_CHECK(context_tokens.size() < whole.size(), "a choice encodes to no tokens after its context");
    continuation_tokens.assign(whole.begin() + long(context_tokens.size()), whole.end());
}

ChoiceExample make_example(const Tokenizer& tokenizer, const std::string& context,
                           const std::vector<std::string>& choices, const std::string& delimiter, int label) {
    QOPT_CHECK(choices.size() >= 2, "an example needs at least two choices, got ", choices.size());
    QOPT_CHECK(label >= 0 && size_t(label) < choices.size(), "label ", label, " out of range for ", choices.size(),
               " choices");
    ChoiceExample example;
    example.label = label;
    for (const std::string& choice : choices) {
        std::vector<int> context_tokens, continuation;
        encode_pair(tokenizer, context, delimiter + choice, context_tokens, continuation);
        if (example.completions.empty()) example.context = context_tokens;
        QOPT_CHECK(context_tokens == example.context, "the context tokenizes differently next to a choice");
        example.completions.push_back(std::move(continuation));
        example.completion_lengths.push_back(double(std::max<size_t>(1, code_points(choice))));
    }
    return example;
}

// Calls per_line(json, line_number) for each non-empty line of a JSONL file.
template <typename F>
void for_each_jsonl(const std::string& path, int limit, F per_line) {
    std::istringstream text(read_file(path));
    std::string line;
    int line_number = 0, used = 0;
    while (std::getline(text, line)) {
        ++line_number;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        if (limit > 0 && used >= limit) break;
        try {
            per_line(Json::parse(line));
        } catch (const Error& e) {
            fail(path, ":", line_number, ": ", e.what());
        }
        ++used;
    }
}

int label_of(const Json& value) {
    // HellaSwag's public files store the label as a string ("2"); the generic format as a number.
    if (value.is_string()) {
        const std::string& s = value.as_string();
        QOPT_CHECK(!s.empty() && s.find_first_not_of("0123456789") == std::string::npos, "label '", s,
                   "' is not an index");
        return std::stoi(s);
    }
    return int(value.as_int("label"));
}

}  // namespace

std::string hellaswag_preprocess(const std::string& raw) {
    const size_t first = raw.find_first_not_of(" \t\n\r"), last = raw.find_last_not_of(" \t\n\r");
    std::string text = first == std::string::npos ? std::string() : raw.substr(first, last - first + 1);
    for (size_t at; (at = text.find(" [title]")) != std::string::npos;) text.replace(at, 8, ". ");
    std::string unbracketed;
    for (size_t i = 0; i < text.size(); ++i) {
        const size_t close = text[i] == '[' ? text.find(']', i + 1) : std::string::npos;
        if (close != std::string::npos) i = close;  // drop "[...]" (shortest match, as re's .*?)
        else unbracketed += text[i];
    }
    // str.replace("  ", " "): one left-to-right pass over non-overlapping pairs.
    std::string out;
    for (size_t i = 0; i < unbracketed.size(); ++i) {
        out += unbracketed[i];
        if (unbracketed[i] == ' ' && i + 1 < unbracketed.size() && unbracketed[i + 1] == ' ') ++i;
    }
    return out;
}

std::vector<ChoiceExample> read_hellaswag_jsonl(const std::string& path, const Tokenizer& tokenizer, int limit) {
    std::vector<ChoiceExample> examples;
    for_each_jsonl(path, limit, [&](const Json& doc) {
        const std::string context = doc.at("ctx_a").as_string("ctx_a") + " " +
                                    capitalize(doc.at("ctx_b").as_string("ctx_b"));
        const std::string query = hellaswag_preprocess(doc.at("activity_label").as_string("activity_label") + ": " +
                                                       context);
        const Json& endings = doc.at("endings");
        QOPT_CHECK(endings.is_array(), "endings must be an array");
        std::vector<std::string> choices;
        for (size_t i = 0; i < endings.size(); ++i) choices.push_back(hellaswag_preprocess(endings[i].as_string("ending")));
        examples.push_back(make_example(tokenizer, query, choices, " ", label_of(doc.at("label"))));
    });
    QOPT_CHECK(!examples.empty(), path, ": no examples");
    return examples;
}

std::vector<ChoiceExample> read_choices_jsonl(const std::string& path, const Tokenizer& tokenizer, int limit) {
    std::vector<ChoiceExample> examples;
    for_each_jsonl(path, limit, [&](const Json& doc) {
        const Json& list = doc.at("choices");
        QOPT_CHECK(list.is_array(), "choices must be an array");
        std::vector<std::string> choices;
        for (size_t i = 0; i < list.size(); ++i) choices.push_back(list[i].as_string("choice"));
        const std::string delimiter = doc.contains("delimiter") ? doc.at("delimiter").as_string("delimiter") : " ";
        examples.push_back(make_example(tokenizer, doc.at("context").as_string("context"), choices, delimiter,
                                        label_of(doc.at("label"))));
    });
    QOPT_CHECK(!examples.empty(), path, ": no examples");
    return examples;
}

std::vector<ChoiceExample> read_llmc_eval_bin(const std::string& path, const Tokenizer* tokenizer, int limit) {
    const std::string bytes = read_file(path);
    QOPT_CHECK(bytes.size() >= 1024, path, ": too short for the 1024-byte header (", bytes.size(), " bytes)");
    int32_t header[256];
    std::memcpy(header, bytes.data(), sizeof header);
    QOPT_CHECK(header[0] == 20240522, path, ": bad magic ", header[0], " (llm.c eval files have 20240522)");
    QOPT_CHECK(header[1] == 1, path, ": unsupported version ", header[1]);
    QOPT_CHECK(header[2] > 0, path, ": ", header[2], " examples");
    QOPT_CHECK((bytes.size() - 1024) % 2 == 0, path, ": odd payload size");
    const size_t n_words = (bytes.size() - 1024) / 2;
    std::vector<uint16_t> words(n_words);
    std::memcpy(words.data(), bytes.data() + 1024, n_words * 2);
    size_t at = 0;
    auto next = [&](const char* field) -> int {
        QOPT_CHECK(at < n_words, path, ": truncated (reading ", field, ")");
        return words[at++];
    };
    std::vector<ChoiceExample> examples;
    const int n_examples = limit > 0 ? std::min(limit, int(header[2])) : int(header[2]);
    for (int e = 0; e < n_examples; ++e) {
        const size_t start = at;
        QOPT_CHECK(next("example start") == 65535, path, ": example ", e, " does not start with the delimiter 65535");
        const int example_bytes = next("example bytes");
        next("example index");
        ChoiceExample example;
        example.label = next("label");
        const int n_completions = next("completion count");
        QOPT_CHECK(n_completions >= 2 && example.label < n_completions, path, ": example ", e, " has ",
                   n_completions, " completions and label ", example.label);
        const int n_context = next("context length");
        for (int i = 0; i < n_context; ++i) example.context.push_back(next("context tokens"));
        for (int c = 0; c < n_completions; ++c) {
            const int n = next("completion length");
            QOPT_CHECK(n > 0, path, ": example ", e, " has an empty completion");
            std::vector<int> tokens;
            for (int i = 0; i < n; ++i) tokens.push_back(next("completion tokens"));
            double length = double(n);
            if (tokenizer) {
                std::string text = tokenizer->decode(tokens);
                if (!text.empty() && text[0] == ' ') text.erase(0, 1);  // the delimiter
                length = double(std::max<size_t>(1, code_points(text)));
            }
            example.completions.push_back(std::move(tokens));
            example.completion_lengths.push_back(length);
        }
        QOPT_CHECK(size_t(example_bytes) == (at - start) * 2, path, ": example ", e, " declares ", example_bytes,
                   " bytes but holds ", (at - start) * 2);
        examples.push_back(std::move(example));
    }
    return examples;
}

std::vector<ChoiceExample> read_choice_task(const std::string& path, const std::string& format,
                                            const Tokenizer* tokenizer, int limit) {
    std::string kind = format;
    if (kind == "auto") {
        const bool bin = path.size() >= 4 && path.compare(path.size() - 4, 4, ".bin") == 0;
        if (bin) kind = "hellaswag-bin";
        else kind = read_file(path).find("\"ctx_a\"") != std::string::npos ? "hellaswag" : "choices";
    }
    if (kind == "hellaswag-bin") return read_llmc_eval_bin(path, tokenizer, limit);
    QOPT_CHECK(kind == "hellaswag" || kind == "choices", "task format must be hellaswag, hellaswag-bin, choices or "
               "auto, got '", format, "'");
    QOPT_CHECK(tokenizer, path, ": a JSONL task needs the tokenizer (--tokenizer)");
    return kind == "hellaswag" ? read_hellaswag_jsonl(path, *tokenizer, limit)
                               : read_choices_jsonl(path, *tokenizer, limit);
}

ChoiceResult choice_accuracy(const std::vector<ChoiceExample>& examples,
                             std::vector<std::vector<double>> log_likelihoods) {
    QOPT_CHECK(log_likelihoods.size() == examples.size(), "one row of log-likelihoods per example");
    ChoiceResult result;
    result.examples = int(examples.size());
    int correct = 0, correct_norm = 0;
    for (size_t e = 0; e < examples.size(); ++e) {
        const auto& ll = log_likelihoods[e];
        const auto& lengths = examples[e].completion_lengths;
        size_t best = 0, best_norm = 0;
        for (size_t c = 1; c < ll.size(); ++c) {
            if (ll[c] > ll[best]) best = c;
            if (ll[c] / lengths[c] > ll[best_norm] / lengths[best_norm]) best_norm = c;
        }
        correct += int(best) == examples[e].label;
        correct_norm += int(best_norm) == examples[e].label;
    }
    const double n = double(examples.size());
    result.acc = correct / n;
    result.acc_norm = correct_norm / n;
    result.acc_stderr = n > 1 ? std::sqrt(result.acc * (1 - result.acc) / (n - 1)) : 0.0;
    result.log_likelihoods = std::move(log_likelihoods);
    return result;
}

ChoiceResult score_choices(EvalModel& model, const std::vector<ChoiceExample>& examples, int batch_size) {
    QOPT_CHECK(batch_size > 0, "batch size must be positive");
    const ModelConfig& config = model.config();
    // One row per (example, choice): tokens = context + completion, left-truncated.
    struct Row {
        std::vector<int> tokens;
        size_t first_target;  // index into tokens of the completion's first token
        size_t example, choice;
    };
    std::vector<Row> rows;
    size_t longest = 1;
    for (size_t e = 0; e < examples.size(); ++e)
        for (size_t c = 0; c < examples[e].completions.size(); ++c) {
            const auto& completion = examples[e].completions[c];
            QOPT_CHECK(completion.size() <= size_t(config.max_seq_len), "example ", e, " choice ", c, ": ",
                       completion.size(), " completion tokens exceed the model's max_seq_len");
            Row row{examples[e].context, examples[e].context.size(), e, c};
            row.tokens.insert(row.tokens.end(), completion.begin(), completion.end());
            if (row.first_target == 0) {  // no context: the harness predicts the first token after EOT
                row.tokens.insert(row.tokens.begin(), 50256 < config.vocab_size ? 50256 : 0);
                row.first_target = 1;
            }
            const size_t keep = size_t(config.max_seq_len) + 1;
            if (row.tokens.size() > keep) {
                const size_t drop = row.tokens.size() - keep;
                row.tokens.erase(row.tokens.begin(), row.tokens.begin() + long(drop));
                row.first_target -= drop;
            }
            check_token_ids(row.tokens.data(), row.tokens.size(), config.vocab_size, "task");
            longest = std::max(longest, row.tokens.size() - 1);
            rows.push_back(std::move(row));
        }
    const int seq_len = int(std::min<size_t>(size_t(config.max_seq_len), (longest + 63) / 64 * 64));
    std::vector<std::vector<double>> log_likelihoods(examples.size());
    for (size_t e = 0; e < examples.size(); ++e) log_likelihoods[e].assign(examples[e].completions.size(), 0.0);
    std::vector<int> inputs(size_t(batch_size) * seq_len), targets(inputs.size());
    for (size_t start = 0; start < rows.size(); start += size_t(batch_size)) {
        const size_t count = std::min(rows.size() - start, size_t(batch_size));
        std::fill(inputs.begin(), inputs.end(), 0);
        std::fill(targets.begin(), targets.end(), 0);
        for (size_t r = 0; r < count; ++r) {
            const auto& tokens = rows[start + r].tokens;
            for (size_t t = 0; t + 1 < tokens.size(); ++t) {
                inputs[r * seq_len + t] = tokens[t];
                targets[r * seq_len + t] = tokens[t + 1];
            }
        }
        model.loss(inputs.data(), targets.data(), batch_size, seq_len);
        const std::vector<float> losses = model.token_losses();
        for (size_t r = 0; r < count; ++r) {
            const Row& row = rows[start + r];
            double sum = 0;  // target index t + 1 is predicted at input position t
            for (size_t t = row.first_target - 1; t + 1 < row.tokens.size(); ++t) sum -= double(losses[r * seq_len + t]);
            log_likelihoods[row.example][row.choice] = sum;
        }
    }
    return choice_accuracy(examples, std::move(log_likelihoods));
}

}  // namespace qopt
