#include "data/loader.hpp"

#include "core/error.hpp"
#include "core/files.hpp"
#include "data/shard.hpp"

namespace qopt {

TokenLoader::TokenLoader(const std::string& pattern, int vocab_size, int batch_size, int seq_len,
                         const char* what, RankSlice slice)
    : vocab_size_(vocab_size), batch_size_(batch_size), seq_len_(seq_len), slice_(slice) {
    QOPT_CHECK(batch_size > 0 && seq_len > 0, what, ": batch size and sequence length must be positive");
    QOPT_CHECK(slice.world_size >= 1 && slice.rank >= 0 && slice.rank < slice.world_size, what, ": rank ", slice.rank,
               " is outside 0..", slice.world_size - 1);
    QOPT_CHECK(batch_size % slice.world_size == 0, what, ": the batch of ", batch_size, " sequences does not split "
               "evenly over ", slice.world_size, " ranks");
    paths_ = expand_glob(pattern, what);
    const uint64_t batch_tokens = uint64_t(batch_size) * uint64_t(seq_len);
    for (const auto& path : paths_) {
        uint64_t count = shard_token_count(path);
        shard_tokens_.push_back(count);
        total_tokens_ += count;
        if (count >= batch_tokens + 1) batches_per_epoch_ += (count - 1) / batch_tokens;
    }
    if (batches_per_epoch_ == 0)
        fail(what, ": '", pattern, "' holds ", total_tokens_, " tokens in ", paths_.size(),
             " shard(s); one batch needs ", batch_tokens + 1, " consecutive tokens in one shard");
    skip_short_shards();
    load_shard(position_.shard_index);
}

void TokenLoader::load_shard(uint64_t index) {
    if (int64_t(index) == loaded_index_) return;
    tokens_ = read_shard(paths_[index], vocab_size_);
    loaded_index_ = int64_t(index);
}

// Moves the position forward to the first shard (from the current one) that still holds a
// whole batch at the current offset, wrapping to the next epoch after the last shard.
void TokenLoader::skip_short_shards() {
    const uint64_t need = uint64_t(batch_size_) * uint64_t(seq_len_) + 1;
    while (position_.token_offset + need > shard_tokens_[position_.shard_index]) {
        position_.token_offset = 0;
        if (++position_.shard_index == paths_.size()) {
            position_.shard_index = 0;
            ++position_.epoch;
        }
    }
}

void TokenLoader::next_batch(std::vector<int>& inputs, std::vector<int>& targets) {
    const size_t n = size_t(rank_batch_size()) * size_t(seq_len_);
    inputs.resize(n);
    targets.resize(n);
    skip_short_shards();
    load_shard(position_.shard_index);
    const uint16_t* window = tokens_.data() + position_.token_offset + size_t(slice_.rank) * n;
    for (size_t i = 0; i < n; ++i) {
        inputs[i] = window[i];
        targets[i] = window[i + 1];
    }
    position_.token_offset += size_t(batch_size_) * size_t(seq_len_);
}

void TokenLoader::set_position(const LoaderPosition& position) {
    QOPT_CHECK(position.shard_index < paths_.size(), "data position names shard ", position.shard_index,
               " but only ", paths_.size(), " shard(s) match");
    QOPT_CHECK(position.token_offset <= shard_tokens_[position.shard_index], "data position offset ",
               position.token_offset, " is past the end of ", paths_[position.shard_index]);
    position_ = position;
}

}  // namespace qopt
