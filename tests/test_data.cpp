// Shards, the loader, JSON and the Brown converter.
#include <cstring>

#include "core/error.hpp"
#include "core/json.hpp"
#include "data/brown.hpp"
#include "data/loader.hpp"
#include "helpers.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

void write_bytes(const std::string& path, const std::string& bytes) { write_file_atomic(path, bytes); }

std::string shard_bytes(int32_t magic, int32_t version, int32_t count, const std::vector<uint16_t>& body) {
    std::string bytes(1024 + body.size() * 2, '\0');
    int32_t header[256] = {};
    header[0] = magic, header[1] = version, header[2] = count;
    std::memcpy(&bytes[0], header, 1024);
    std::memcpy(&bytes[1024], body.data(), body.size() * 2);
    return bytes;
}

}  // namespace

TEST_CASE("shard round trip in llm.c's layout") {
    TempDir dir;
    std::vector<int> tokens = {50256, 0, 1, 65535, 42};
    write_shard(dir / "a.bin", tokens);
    const std::string bytes = read_file(dir / "a.bin");
    REQUIRE(bytes.size() == 1024 + 10);
    int32_t header[3];
    std::memcpy(header, bytes.data(), 12);
    CHECK(header[0] == 20240520);
    CHECK(header[1] == 1);
    CHECK(header[2] == 5);
    auto back = read_shard(dir / "a.bin", 65536);
    CHECK(std::vector<int>(back.begin(), back.end()) == tokens);
    CHECK_THROWS_WITH_AS(write_shard(dir / "b.bin", {70000}), doctest::Contains("does not fit"), Error);
}

TEST_CASE("bad shards are refused with a message naming the file and the problem") {
    TempDir dir;
    const std::string path = dir / "bad.bin";
    SUBCASE("bad magic") {
        write_bytes(path, shard_bytes(12345, 1, 2, {1, 2}));
        CHECK_THROWS_WITH_AS(read_shard(path, 100), doctest::Contains("bad.bin: not a token shard (magic 12345"), Error);
    }
    SUBCASE("wrong version") {
        write_bytes(path, shard_bytes(20240520, 7, 2, {1, 2}));
        CHECK_THROWS_WITH_AS(read_shard(path, 100), doctest::Contains("unsupported shard version 7"), Error);
    }
    SUBCASE("truncated body") {
        write_bytes(path, shard_bytes(20240520, 1, 5, {1, 2}));
        CHECK_THROWS_WITH_AS(read_shard(path, 100), doctest::Contains("truncated shard (header says 5 tokens"), Error);
        CHECK_THROWS_WITH_AS(shard_token_count(path), doctest::Contains("truncated"), Error);
    }
    SUBCASE("trailing bytes") {
        write_bytes(path, shard_bytes(20240520, 1, 1, {1, 2}));
        CHECK_THROWS_WITH_AS(read_shard(path, 100), doctest::Contains("bytes after its 1 tokens"), Error);
    }
    SUBCASE("token id >= vocab") {
        write_bytes(path, shard_bytes(20240520, 1, 3, {1, 100, 2}));
        CHECK_THROWS_WITH_AS(read_shard(path, 100), doctest::Contains("token id 100 at position 1"), Error);
    }
    SUBCASE("shorter than a header") {
        write_bytes(path, "abc");
        CHECK_THROWS_WITH_AS(read_shard(path, 100), doctest::Contains("too short for a shard header"), Error);
    }
    SUBCASE("empty file") {
        write_bytes(path, "");
        CHECK_THROWS_WITH_AS(read_shard(path, 100), doctest::Contains("too short"), Error);
    }
    SUBCASE("missing file") {
        CHECK_THROWS_WITH_AS(read_shard(dir / "nope.bin", 100), doctest::Contains("nope.bin: cannot"), Error);
    }
}

TEST_CASE("loader: consecutive windows, targets shifted by one, short shards skipped, wrap-around") {
    TempDir dir;
    std::vector<int> a(23), b(5), c(12);
    for (int i = 0; i < 23; ++i) a[size_t(i)] = i;
    for (int i = 0; i < 5; ++i) b[size_t(i)] = 100 + i;
    for (int i = 0; i < 12; ++i) c[size_t(i)] = 200 + i;
    write_shard(dir / "s_0.bin", a);
    write_shard(dir / "s_1.bin", b);  // shorter than one batch (2 x 4 + 1): skipped
    write_shard(dir / "s_2.bin", c);
    TokenLoader loader(dir / "s_*.bin", 1000, 2, 4, "test");
    CHECK(loader.batches_per_epoch() == 2 + 0 + 1);
    std::vector<int> x, y;
    loader.next_batch(x, y);
    CHECK(x == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7});
    CHECK(y == std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8});
    loader.next_batch(x, y);
    CHECK(x[0] == 8);
    CHECK(y[7] == 16);
    const LoaderPosition saved = loader.position();
    loader.next_batch(x, y);  // shard 0 has 23 tokens: a third window needs 16..24, so on to shard 2
    CHECK(x[0] == 200);
    loader.next_batch(x, y);  // wraps to shard 0, epoch 1
    CHECK(x[0] == 0);
    CHECK(loader.position().epoch == 1);
    loader.set_position(saved);
    loader.next_batch(x, y);
    CHECK(x[0] == 200);
}

TEST_CASE("loader: rank slices are the single-process batch's rows, through shard skips and wrap-around") {
    TempDir dir;
    std::vector<int> a(53), b(7), c(40);
    for (int i = 0; i < 53; ++i) a[size_t(i)] = i;
    for (int i = 0; i < 7; ++i) b[size_t(i)] = 100 + i;
    for (int i = 0; i < 40; ++i) c[size_t(i)] = 200 + i;
    write_shard(dir / "s_0.bin", a);
    write_shard(dir / "s_1.bin", b);  // shorter than one batch of 4 x 3 + 1: skipped
    write_shard(dir / "s_2.bin", c);
    const int batch = 4, seq_len = 3;
    TokenLoader whole(dir / "s_*.bin", 1000, batch, seq_len, "test");
    for (int world : {2, 4}) {
        CAPTURE(world);
        std::vector<TokenLoader> ranks;
        for (int r = 0; r < world; ++r) ranks.emplace_back(dir / "s_*.bin", 1000, batch, seq_len, "test", RankSlice{r, world});
        whole.reset();
        for (int step = 0; step < 9; ++step) {  // 4 + 3 batches an epoch: past the wrap
            std::vector<int> x, y, joined_x, joined_y;
            whole.next_batch(x, y);
            for (auto& rank : ranks) {
                std::vector<int> rx, ry;
                rank.next_batch(rx, ry);
                CHECK(rx.size() == size_t(batch / world * seq_len));
                joined_x.insert(joined_x.end(), rx.begin(), rx.end());
                joined_y.insert(joined_y.end(), ry.begin(), ry.end());
                CHECK(rank.position().token_offset == whole.position().token_offset);
                CHECK(rank.position().epoch == whole.position().epoch);
            }
            CHECK(joined_x == x);
            CHECK(joined_y == y);
        }
    }
    CHECK_THROWS_WITH_AS(TokenLoader(dir / "s_*.bin", 1000, 4, 3, "--train-data", RankSlice{0, 3}),
                         doctest::Contains("--train-data: the batch of 4 sequences does not split evenly over 3 ranks"),
                         Error);
    CHECK_THROWS_WITH_AS(TokenLoader(dir / "s_*.bin", 1000, 4, 3, "--train-data", RankSlice{2, 2}),
                         doctest::Contains("rank 2 is outside 0..1"), Error);
}

TEST_CASE("loader: bad patterns and too little data") {
    TempDir dir;
    CHECK_THROWS_WITH_AS(TokenLoader(dir / "none_*.bin", 10, 1, 4, "--train-data"),
                         doctest::Contains("--train-data: no file matches"), Error);
    CHECK_THROWS_WITH_AS(TokenLoader("", 10, 1, 4, "--val-data"), doctest::Contains("--val-data: empty file pattern"),
                         Error);
    write_shard(dir / "tiny.bin", {1, 2, 3});
    CHECK_THROWS_WITH_AS(TokenLoader(dir / "tiny.bin", 10, 1, 4, "--train-data"),
                         doctest::Contains("one batch needs 5 consecutive tokens"), Error);
    write_shard(dir / "big.bin", {1, 2, 3, 4, 5, 6, 7, 8, 9, 50});
    CHECK_THROWS_WITH_AS(TokenLoader(dir / "big.bin", 10, 1, 4, "--train-data"),
                         doctest::Contains("big.bin: token id 50 at position 9"), Error);
}

TEST_CASE("JSON: round trip, escapes, 64-bit integers, errors") {
    Json j = Json::parse(R"({"a": [1, -2, 3.5, true, null], "s": "x\"y\\n\u00e9\ud83d\ude00", "big": 18446744073709551615})");
    CHECK(j.at("a")[0].as_int() == 1);
    CHECK(j.at("a")[1].as_int() == -2);
    CHECK(j.at("a")[2].as_double() == 3.5);
    CHECK(j.at("s").as_string() == "x\"y\\n\xC3\xA9\xF0\x9F\x98\x80");
    CHECK(j.at("big").as_uint() == 18446744073709551615ull);
    CHECK(Json::parse(j.dump()).dump() == j.dump());
    CHECK_THROWS_WITH_AS(Json::parse("{\"a\": }"), doctest::Contains("malformed JSON"), Error);
    CHECK_THROWS_WITH_AS(Json::parse("[1, 2"), doctest::Contains("malformed JSON"), Error);
    CHECK_THROWS_WITH_AS(Json::parse("{} x"), doctest::Contains("trailing"), Error);
    CHECK_THROWS_WITH_AS(j.at("missing"), doctest::Contains("missing JSON field 'missing'"), Error);
    CHECK_THROWS_WITH_AS(j.at("s").as_int("s"), doctest::Contains("s must be an integer"), Error);
    std::string deep(1000, '[');
    CHECK_THROWS_WITH_AS(Json::parse(deep), doctest::Contains("nesting too deep"), Error);
}

TEST_CASE("Brown corpus tags are stripped and punctuation joined as printed") {
    const std::string tagged =
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc it's/pps+bez 1/2/cd (/( ok/jj )/) ./.\n"
        "\tNext/ap sentence/nn ?/. \n";
    CHECK(brown_to_text(tagged) == "The jury said \"no evidence\", and it's 1/2 (ok). Next sentence?");
}
