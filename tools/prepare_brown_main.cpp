// prepare_brown: turns the tagged Brown corpus into plain text and GPT-2 token shards.
// Documents (the 500 files) are split train/val by document: every 20th goes to val.
// Each document is written as <|endoftext|> followed by its tokens, as llm.c's data
// scripts do. Also writes the plain text and a stats.json with token counts, the
// tokenizer's measured speed, and the unigram baseline (the val cross-entropy of the
// train set's add-one-smoothed unigram distribution: the loss a model must beat).
#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <regex>

#include "core/error.hpp"
#include "core/files.hpp"
#include "core/json.hpp"
#include "data/brown.hpp"
#include "data/shard.hpp"
#include "data/tokenizer.hpp"

int main(int argc, char** argv) {
    CLI::App app{"qopt prepare_brown: Brown corpus (form C) -> plain text + GPT-2 token shards"};
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // last repeated flag wins
    std::string corpus_dir, vocab_dir, out_dir;
    int val_every = 20;
    app.add_option("--corpus", corpus_dir, "Folder of the tagged Brown files (ca01 .. cr09)")->required();
    app.add_option("--vocab", vocab_dir, "Folder with GPT-2's encoder.json and vocab.bpe")->required();
    app.add_option("--out", out_dir, "Output folder for brown_{train,val}_000000.bin and text")->required();
    app.add_option("--val-every", val_every, "Every N-th document goes to validation")->capture_default_str();
    CLI11_PARSE(app, argc, argv);
    try {
        QOPT_CHECK(val_every >= 2, "--val-every must be at least 2");
        const qopt::Tokenizer tokenizer = qopt::Tokenizer::load_dir(vocab_dir);
        std::vector<std::string> files;
        const std::regex name_pattern("c[a-r][0-9][0-9]");
        for (const auto& name : qopt::list_directory(corpus_dir))
            if (std::regex_match(name, name_pattern)) files.push_back(name);
        if (files.empty()) qopt::fail(corpus_dir, ": no Brown corpus files (ca01 .. cr09) found");
        qopt::make_directories(out_dir);

        std::vector<int> train_tokens, val_tokens;
        std::string train_text, val_text;
        double tokenize_seconds = 0;
        size_t text_bytes = 0;
        for (size_t i = 0; i < files.size(); ++i) {
            const std::string text = qopt::brown_to_text(qopt::read_file(corpus_dir + "/" + files[i]));
            const auto start = std::chrono::steady_clock::now();
            std::vector<int> ids = tokenizer.encode(text);
            tokenize_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            text_bytes += text.size();
            const bool is_val = i % size_t(val_every) == 0;
            auto& tokens = is_val ? val_tokens : train_tokens;
            tokens.push_back(tokenizer.eot_id());
            tokens.insert(tokens.end(), ids.begin(), ids.end());
            (is_val ? val_text : train_text) += text + "\n\n";
        }
        qopt::write_shard(out_dir + "/brown_train_000000.bin", train_tokens);
        qopt::write_shard(out_dir + "/brown_val_000000.bin", val_tokens);
        qopt::write_file_atomic(out_dir + "/brown_train.txt", train_text);
        qopt::write_file_atomic(out_dir + "/brown_val.txt", val_text);

        // Unigram baseline: p(v) = (count_train(v) + 1) / (N_train + V); loss = mean -log p over val.
        std::vector<double> counts(size_t(tokenizer.vocab_size()), 1.0);
        for (int t : train_tokens) counts[size_t(t)] += 1;
        const double denom = double(train_tokens.size()) + double(tokenizer.vocab_size());
        double unigram = 0;
        for (int t : val_tokens) unigram -= std::log(counts[size_t(t)] / denom);
        unigram /= double(val_tokens.size());

        qopt::Json stats = qopt::Json::object();
        stats["documents"] = int64_t(files.size());
        stats["train_tokens"] = uint64_t(train_tokens.size());
        stats["val_tokens"] = uint64_t(val_tokens.size());
        stats["text_bytes"] = uint64_t(text_bytes);
        stats["tokenizer_mb_per_s"] = double(text_bytes) / 1e6 / tokenize_seconds;
        stats["unigram_val_loss"] = unigram;
        qopt::write_file_atomic(out_dir + "/stats.json", stats.dump() + "\n");
        std::printf("prepare_brown: %zu documents, %.1f MB of text -> %zu train + %zu val tokens\n", files.size(),
                    double(text_bytes) / 1e6, train_tokens.size(), val_tokens.size());
        std::printf("prepare_brown: tokenizer %.2f MB/s on one core; unigram baseline val loss %.3f\n",
                    double(text_bytes) / 1e6 / tokenize_seconds, unigram);
        return 0;
    } catch (const qopt::Error& e) {
        std::cerr << "prepare_brown: error: " << e.what() << "\n";
        return 1;
    }
}
