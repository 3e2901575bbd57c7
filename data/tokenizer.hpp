// GPT-2's byte-level BPE tokenizer, written from its definition:
//  1. pre-tokenization splits text the way GPT-2's regex
//       's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//     does (hand-written scanner, Unicode letter/number tables in unicode_tables.inc);
//  2. each piece's bytes are mapped to token ids of single bytes;
//  3. adjacent pairs are merged by ascending rank from vocab.bpe until none applies.
// Invalid UTF-8 bytes are kept as single "other symbol" characters, so
// decode(encode(bytes)) == bytes for any input.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace qopt {

class Tokenizer {
public:
    // Loads GPT-2's encoder.json (token string -> id) and vocab.bpe (merges by rank).
    // Throws qopt::Error naming the file on anything malformed.
    static Tokenizer load(const std::string& encoder_json_path, const std::string& vocab_bpe_path);
    // The same from the files' contents (errors name the two origins).
    static Tokenizer parse(const std::string& encoder_json_text, const std::string& vocab_bpe_text,
                           const std::string& encoder_json_path, const std::string& vocab_bpe_path);
    // Loads encoder.json and vocab.bpe from one directory.
    static Tokenizer load_dir(const std::string& directory);

    // Ordinary text encoding: special tokens written in the text are plain text.
    // Not thread-safe (keeps a cache of pieces already encoded).
    std::vector<int> encode(std::string_view text) const;
    std::string decode(const std::vector<int>& ids) const;  // throws on an id out of range
    const std::string& token_bytes(int id) const { return token_bytes_.at(size_t(id)); }

    int vocab_size() const { return int(token_bytes_.size()); }
    int eot_id() const { return eot_id_; }  // "<|endoftext|>", 50256 for GPT-2

private:
    void encode_piece(std::string_view piece, std::vector<int>& out) const;

    std::vector<std::string> token_bytes_;         // id -> raw bytes
    int byte_ids_[256] = {};                       // byte -> id of its one-byte token
    std::unordered_map<uint64_t, std::pair<int, int>> merges_;  // (left,right) -> (rank, merged id)
    int eot_id_ = -1;
    mutable std::unordered_map<std::string, std::vector<int>> cache_;
};

// Pre-tokenization alone (exposed for tests): the byte ranges of the pieces.
std::vector<std::string_view> pretokenize(std::string_view text);

}  // namespace qopt
