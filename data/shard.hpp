// Token shards in llm.c's format: a header of 256 int32 (magic 20240520, version 1,
// token count, rest zero) followed by the tokens as uint16. Readers check everything a
// damaged or foreign file can get wrong and name the file in the error.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace qopt {

constexpr int32_t kShardMagic = 20240520;
constexpr int32_t kShardVersion = 1;
constexpr size_t kShardHeaderInts = 256;

// Writes atomically; throws when a token does not fit uint16.
void write_shard(const std::string& path, const std::vector<int>& tokens);

// Reads and validates a shard: magic, version, body size against the header's count, and
// every token id below `vocab_size`.
std::vector<uint16_t> read_shard(const std::string& path, int vocab_size);

// The same from a shard's bytes in memory (errors name `origin`).
std::vector<uint16_t> parse_shard(const std::string& bytes, int vocab_size, const std::string& origin);

// Header only (count of tokens), validated against the file length.
uint64_t shard_token_count(const std::string& path);

}  // namespace qopt
