// safetensors and checkpoints: round trips, damage detection, atomic replacement, pruning.
#include <cstring>
#include <sstream>

#include "core/error.hpp"
#include "core/safetensors.hpp"
#include "helpers.hpp"
#include "train/checkpoint.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

Checkpoint make_checkpoint(long step, uint64_t seed) {
    Checkpoint c;
    c.config = preset_config("gpt2-tiny");
    c.config.vocab_size = 50;
    c.config.padded_vocab_size = 64;
    c.config.max_seq_len = 16;
    const size_t total = ParamLayout::build(c.config).total;
    std::mt19937_64 gen(seed);
    c.params = random_vector<float>(total, gen);
    // An optimizer state with tensors of several shapes and a scalar in `extra`.
    c.optimizer.optimizer = "muon";
    c.optimizer.tensors.push_back({"layers.0.mlp.up.weight.momentum", {8, 3}, random_vector<float>(24, gen)});
    c.optimizer.tensors.push_back({"embed.weight.exp_avg", {5}, random_vector<float>(5, gen)});
    c.optimizer.extra["counter"] = int64_t(7);
    c.state.step = step;
    c.state.tokens_seen = 123456789012ull;
    c.state.skipped_steps = 2;
    c.state.train_position = {3, 4096, 1};
    c.state.rng_state = {1, 2, 0xFFFFFFFFFFFFFFFFull, 4};
    c.optimizer.step = step - 2;
    c.run = Json::object();
    c.run["optimizer"] = "adamw";
    return c;
}

}  // namespace

TEST_CASE("safetensors: header layout, round trip, and validation") {
    std::vector<float> a = {1, 2, 3, 4, 5, 6}, b = {7};
    const std::string bytes = safetensors_serialize({{"a", {2, 3}, a.data()}, {"b", {1}, b.data()}}, {{"k", "v"}});
    uint64_t header_size = 0;
    std::memcpy(&header_size, bytes.data(), 8);
    CHECK(header_size % 8 == 0);
    CHECK(bytes.size() == 8 + header_size + 7 * 4);
    const Json header = Json::parse(bytes.substr(8, header_size));
    CHECK(header.at("a").at("dtype").as_string() == "F32");
    CHECK(header.at("b").at("data_offsets")[0].as_int() == 24);
    const SafetensorsFile file = SafetensorsFile::parse(bytes, "mem");
    CHECK(file.metadata().at("k") == "v");
    CHECK(file.f32("a", {2, 3}) == a);
    CHECK_THROWS_WITH_AS(file.f32("a", {3, 2}), doctest::Contains("has shape [2, 3], expected [3, 2]"), Error);
    CHECK_THROWS_WITH_AS(file.f32("c", {1}), doctest::Contains("missing tensor 'c'"), Error);
    CHECK_THROWS_WITH_AS(SafetensorsFile::parse(bytes.substr(0, bytes.size() - 4), "cut"),
                         doctest::Contains("outside the"), Error);
    std::string huge = bytes;
    huge[7] = char(0x7F);
    CHECK_THROWS_WITH_AS(SafetensorsFile::parse(huge, "huge"), doctest::Contains("header length"), Error);
    CHECK_THROWS_WITH_AS(SafetensorsFile::parse("abc", "tiny"), doctest::Contains("too short"), Error);
}

TEST_CASE("checkpoint round trip keeps every tensor and counter exactly") {
    TempDir dir;
    const Checkpoint c = make_checkpoint(40, 1);
    const std::string path = write_checkpoint(dir.path, c);
    CHECK(path == dir / "checkpoints/step_00000040");
    const Checkpoint back = read_checkpoint(path);
    CHECK(back.config.difference(c.config).empty());
    CHECK(back.params == c.params);
    REQUIRE(back.optimizer.tensors.size() == 2);
    for (const auto& t : c.optimizer.tensors) {
        const StateTensor* read = back.optimizer.find(t.name);
        REQUIRE(read != nullptr);
        CHECK(read->shape == t.shape);
        CHECK(read->values == t.values);
    }
    CHECK(back.optimizer.optimizer == "muon");
    CHECK(back.optimizer.extra.at("counter").as_int() == 7);
    CHECK(back.state.step == 40);
    CHECK(back.state.tokens_seen == c.state.tokens_seen);
    CHECK(back.state.skipped_steps == 2);
    CHECK(back.state.train_position.shard_index == 3);
    CHECK(back.state.train_position.token_offset == 4096);
    CHECK(back.state.train_position.epoch == 1);
    CHECK(back.state.rng_state == c.state.rng_state);
    CHECK(back.optimizer.step == 38);
    // The weights file is plain safetensors with the config in its metadata.
    const SafetensorsFile weights = SafetensorsFile::load(path + "/model.safetensors");
    CHECK(ModelConfig::from_json(Json::parse(weights.metadata().at("qopt_config"))).difference(c.config).empty());
    CHECK(weights.has("layers.1.mlp.down.weight"));
    // No temporary folders are left behind.
    CHECK(list_directory(dir / "checkpoints") == std::vector<std::string>{"step_00000040"});
}

TEST_CASE("damaged checkpoints are refused; latest_valid_checkpoint falls back to an older one") {
    TempDir dir;
    write_checkpoint(dir.path, make_checkpoint(10, 1));
    const std::string newest = write_checkpoint(dir.path, make_checkpoint(20, 2));
    SUBCASE("bit flip") {
        std::string bytes = read_file(newest + "/model.safetensors");
        bytes[bytes.size() / 2] ^= 1;
        write_file_atomic(newest + "/model.safetensors", bytes);
        CHECK_THROWS_WITH_AS(read_checkpoint(newest), doctest::Contains("checksum mismatch"), Error);
    }
    SUBCASE("truncation") {
        std::string bytes = read_file(newest + "/optimizer.safetensors");
        write_file_atomic(newest + "/optimizer.safetensors", bytes.substr(0, bytes.size() / 3));
        CHECK_THROWS_WITH_AS(read_checkpoint(newest), doctest::Contains("optimizer.safetensors: checksum mismatch"),
                             Error);
    }
    SUBCASE("state file damaged") {
        write_file_atomic(newest + "/state.json", "{\"format_version\": 1, ");
        CHECK_THROWS_WITH_AS(read_checkpoint(newest), doctest::Contains("state.json: unreadable"), Error);
    }
    SUBCASE("missing file") {
        remove_all(newest + "/model.safetensors");
        CHECK_THROWS_WITH_AS(read_checkpoint(newest), doctest::Contains("model.safetensors: cannot open"), Error);
    }
    std::ostringstream log;
    CHECK(latest_valid_checkpoint(dir.path, log) == dir / "checkpoints/step_00000010");
    CHECK(log.str().find("skipping damaged checkpoint") != std::string::npos);
}

TEST_CASE("rewriting a step replaces it whole; pruning keeps the newest K") {
    TempDir dir;
    for (long step : {5, 10, 15, 20}) write_checkpoint(dir.path, make_checkpoint(step, uint64_t(step)));
    const Checkpoint replacement = make_checkpoint(20, 99);
    write_checkpoint(dir.path, replacement);
    CHECK(read_checkpoint(dir / "checkpoints/step_00000020").params == replacement.params);
    prune_checkpoints(dir.path, 2);
    CHECK(list_checkpoints(dir.path) ==
          std::vector<std::string>{dir / "checkpoints/step_00000020", dir / "checkpoints/step_00000015"});
    CHECK_THROWS_WITH_AS(read_checkpoint(dir / "checkpoints/nope"), doctest::Contains("no such checkpoint"), Error);
}

TEST_CASE("init_model writes the exact initial weights train starts from; bad input is one line") {
    const std::string init_model = bin_dir() + "/init_model";
    if (!file_exists(init_model)) {
        MESSAGE("skipped: " << init_model << " not built (run through `make test`)");
        return;
    }
    TempDir dir;
    std::string output;
    REQUIRE(run_command(init_model + " --preset gpt2-tiny --seed 99 --out-dir " + dir.path, output) == 0);
    const Checkpoint checkpoint = read_checkpoint(dir.path + "/checkpoints/" + checkpoint_name(0));
    const ModelConfig config = preset_config("gpt2-tiny");
    CHECK(checkpoint.config.difference(config).empty());
    std::vector<float> expected(ParamLayout::build(config).total);
    init_params(ParamLayout::build(config), 99, expected.data());
    CHECK(checkpoint.params == expected);
    CHECK(checkpoint.state.step == 0);

    CHECK(run_command(init_model + " --preset nope --out-dir " + dir.path, output) == 1);
    CHECK(output.find("unknown preset 'nope'") != std::string::npos);
    CHECK(run_command(init_model + " --preset gpt2-tiny", output) != 0);  // --out-dir is required
    CHECK(output.find("--out-dir is required") != std::string::npos);
}
