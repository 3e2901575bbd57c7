#include "data/shard.hpp"

#include <cstring>

#include "core/error.hpp"
#include "core/files.hpp"

namespace qopt {

void write_shard(const std::string& path, const std::vector<int>& tokens) {
    std::string bytes(kShardHeaderInts * sizeof(int32_t) + tokens.size() * sizeof(uint16_t), '\0');
    int32_t header[kShardHeaderInts] = {};
    header[0] = kShardMagic;
    header[1] = kShardVersion;
    QOPT_CHECK(tokens.size() <= size_t(INT32_MAX), path, ": too many tokens for one shard (",
               tokens.size(), ")");
    header[2] = int32_t(tokens.size());
    std::memcpy(&bytes[0], header, sizeof header);
    uint16_t* body = reinterpret_cast<uint16_t*>(&bytes[sizeof header]);
    for (size_t i = 0; i < tokens.size(); ++i) {
        QOPT_CHECK(tokens[i] >= 0 && tokens[i] < 65536, path, ": token id ", tokens[i],
                   " at position ", i, " does not fit the shard's uint16");
        body[i] = uint16_t(tokens[i]);
    }
    write_file_atomic(path, bytes);
}

static uint64_t validate_header(const std::string& path, const int32_t* header, uint64_t size) {
    if (header[0] != kShardMagic)
        fail(path, ": not a token shard (magic ", header[0], ", expected ", kShardMagic, ")");
    if (header[1] != kShardVersion)
        fail(path, ": unsupported shard version ", header[1], " (expected ", kShardVersion, ")");
    if (header[2] < 0) fail(path, ": negative token count ", header[2]);
    const uint64_t count = uint64_t(header[2]);
    const uint64_t expected = kShardHeaderInts * sizeof(int32_t) + count * sizeof(uint16_t);
    if (size < expected)
        fail(path, ": truncated shard (header says ", count, " tokens = ", expected, " bytes, file has ",
             size, ")");
    if (size > expected)
        fail(path, ": shard has ", size - expected, " bytes after its ", count, " tokens");
    return count;
}

uint64_t shard_token_count(const std::string& path) {
    const uint64_t size = file_size(path);
    if (size < kShardHeaderInts * sizeof(int32_t))
        fail(path, ": too short for a shard header (", size, " bytes)");
    FILE* file = std::fopen(path.c_str(), "rb");
    if (!file) fail(path, ": cannot open");
    int32_t header[kShardHeaderInts];
    size_t got = std::fread(header, sizeof(int32_t), kShardHeaderInts, file);
    std::fclose(file);
    if (got != kShardHeaderInts) fail(path, ": cannot read the shard header");
    return validate_header(path, header, size);
}

std::vector<uint16_t> read_shard(const std::string& path, int vocab_size) {
    return parse_shard(read_file(path), vocab_size, path);
}

std::vector<uint16_t> parse_shard(const std::string& bytes, int vocab_size, const std::string& path) {
    if (bytes.size() < kShardHeaderInts * sizeof(int32_t))
        fail(path, ": too short for a shard header (", bytes.size(), " bytes)");
    int32_t header[kShardHeaderInts];
    std::memcpy(header, bytes.data(), sizeof header);
    const uint64_t count = validate_header(path, header, bytes.size());
    std::vector<uint16_t> tokens(count);
    if (count) std::memcpy(tokens.data(), bytes.data() + sizeof header, count * sizeof(uint16_t));
    for (uint64_t i = 0; i < count; ++i)
        if (tokens[i] >= vocab_size)
            fail(path, ": token id ", tokens[i], " at position ", i, " is not below the vocabulary size ",
                 vocab_size);
    return tokens;
}

}  // namespace qopt
