// tokenize: GPT-2 BPE from text to ids (printed, or written as a shard) and back.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstring>
#include <iostream>
#include <iterator>
#include <sstream>

#include "core/error.hpp"
#include "core/files.hpp"
#include "data/shard.hpp"
#include "data/tokenizer.hpp"

static std::string read_input(const std::string& path) {
    if (path.empty() || path == "-") {
        std::ostringstream buffer;
        buffer << std::cin.rdbuf();
        return buffer.str();
    }
    return qopt::read_file(path);
}

int main(int argc, char** argv) {
    CLI::App app{"qopt tokenize: GPT-2 byte-level BPE. Text -> ids (one line, or a .bin shard with --out); "
                 "--decode: ids or a shard -> text"};
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // last repeated flag wins
    std::string input, vocab_dir = "build/data/gpt2", out_path, format = "text";
    bool decode = false, prepend_eot = false, stats = false;
    app.add_option("input", input, "Input file ('-' or none: standard input)");
    app.add_option("--vocab", vocab_dir, "Folder with encoder.json and vocab.bpe")->capture_default_str();
    app.add_option("--format", format, "Encode output: text (space-separated ids on one line) or count")
        ->capture_default_str();
    app.add_option("--out", out_path, "Encode: write the ids as an llm.c shard to this file instead");
    app.add_flag("--eot", prepend_eot, "Encode: start with <|endoftext|> (as llm.c's shards do per document)");
    app.add_flag("--decode", decode, "Decode: input is whitespace-separated ids, or a .bin shard");
    app.add_flag("--stats", stats, "Print tokens, bytes and MB/s to standard error");
    CLI11_PARSE(app, argc, argv);
    try {
        QOPT_CHECK(format == "text" || format == "count", "--format must be text or count, got '", format, "'");
        const qopt::Tokenizer tokenizer = qopt::Tokenizer::load_dir(vocab_dir);
        if (decode) {
            std::vector<int> ids;
            const std::string data = read_input(input);
            int32_t magic = 0;
            if (data.size() >= 4) std::memcpy(&magic, data.data(), 4);
            if (magic == qopt::kShardMagic && !input.empty() && input != "-") {
                for (uint16_t t : qopt::read_shard(input, tokenizer.vocab_size())) ids.push_back(t);
            } else {
                std::istringstream in(data);
                std::string word;
                while (in >> word) {
                    char* end = nullptr;
                    long id = std::strtol(word.c_str(), &end, 10);
                    if (*end != '\0') qopt::fail("not a token id: '", word, "'");
                    if (id < 0 || id >= tokenizer.vocab_size())
                        qopt::fail("token id ", id, " is outside the vocabulary 0..", tokenizer.vocab_size() - 1);
                    ids.push_back(int(id));
                }
            }
            std::cout << tokenizer.decode(ids);
            return 0;
        }
        const std::string text = read_input(input);
        const auto start = std::chrono::steady_clock::now();
        std::vector<int> ids;
        if (prepend_eot) ids.push_back(tokenizer.eot_id());
        std::vector<int> body = tokenizer.encode(text);
        ids.insert(ids.end(), body.begin(), body.end());
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (!out_path.empty()) {
            qopt::write_shard(out_path, ids);
        } else if (format == "count") {
            std::cout << ids.size() << "\n";
        } else {
            std::string line;
            for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
            std::cout << line << "\n";
        }
        if (stats)
            std::cerr << "tokenize: " << ids.size() << " tokens from " << text.size() << " bytes in " << seconds
                      << " s (" << double(text.size()) / 1e6 / seconds << " MB/s)\n";
        return 0;
    } catch (const qopt::Error& e) {
        std::cerr << "tokenize: error: " << e.what() << "\n";
        return 1;
    }
}
