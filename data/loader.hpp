// Reads (inputs, targets) batches of B sequences of T tokens from a list of shards, in
// order, the way llm.c does: each batch is B*T+1 consecutive tokens (targets are inputs
// shifted by one); the position then advances by B*T; a shard too short for the next batch
// is left for the next one; after the last shard it wraps (epoch + 1). The position is
// two integers, saved in checkpoints so resume continues with the same data.
// Data parallelism: with a RankSlice, batch_size is the global batch and rank r of W reads only
// its rows [r B/W, (r + 1) B/W) of it (its B/W rows are B/W*T+1 consecutive tokens inside the
// window), while the position still advances by the whole B*T: the ranks' rows together are
// exactly the batch a single process reads, so a W-rank run sees the same data in the same steps.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace qopt {

struct RankSlice {
    int rank = 0, world_size = 1;
};

struct LoaderPosition {
    uint64_t shard_index = 0;
    uint64_t token_offset = 0;
    uint64_t epoch = 0;
};

class TokenLoader {
public:
    // Throws when the pattern matches nothing, a shard is invalid, or no shard holds one batch.
    // Also throws when the slice's world size does not divide batch_size.
    TokenLoader(const std::string& pattern, int vocab_size, int batch_size, int seq_len, const char* what,
                RankSlice slice = {});

    // Fills inputs and targets with (B/W)*T ids each: this rank's rows of the next batch.
    void next_batch(std::vector<int>& inputs, std::vector<int>& targets);
    int rank_batch_size() const { return batch_size_ / slice_.world_size; }
    // How many whole batches one pass over the data gives (for validation).
    uint64_t batches_per_epoch() const { return batches_per_epoch_; }
    uint64_t total_tokens() const { return total_tokens_; }
    const std::vector<std::string>& paths() const { return paths_; }

    LoaderPosition position() const { return position_; }
    void set_position(const LoaderPosition& position);  // validates against the shards
    void reset() { set_position(LoaderPosition{}); }

private:
    void load_shard(uint64_t index);
    void skip_short_shards();

    std::vector<std::string> paths_;
    std::vector<uint64_t> shard_tokens_;
    int vocab_size_, batch_size_, seq_len_;
    RankSlice slice_;
    uint64_t batches_per_epoch_ = 0, total_tokens_ = 0;
    LoaderPosition position_;
    int64_t loaded_index_ = -1;
    std::vector<uint16_t> tokens_;
};

}  // namespace qopt
