// The GPT-2 tokenizer: reference ids (../shared/README.md and a fixture made by GPT-2's own
// reference tokenizers, tools/gpt2_tokenizer_oracle.py), pre-tokenization rules, round trips
// on arbitrary bytes, and malformed vocabulary files.
#include "core/error.hpp"
#include "core/json.hpp"
#include "data/tokenizer.hpp"
#include "helpers.hpp"

#include <memory>

using namespace qopt;
using namespace qopt::test;

namespace {

const Tokenizer* gpt2() {
    static std::unique_ptr<Tokenizer> tok;
    static bool tried = false;
    if (!tried) {
        tried = true;
        const std::string dir = data_dir() + "/gpt2";
        if (file_exists(dir + "/encoder.json")) tok = std::make_unique<Tokenizer>(Tokenizer::load_dir(dir));
    }
    return tok.get();
}

#define REQUIRE_VOCAB()                                                                                       \
    if (!gpt2()) {                                                                                            \
        MESSAGE("skipped: GPT-2 vocabulary not found in " << data_dir() << "/gpt2 (run `make setup` first)"); \
        return;                                                                                               \
    }

std::vector<std::string> pieces(const std::string& text) {
    std::vector<std::string> out;
    for (auto p : pretokenize(text)) out.emplace_back(p);
    return out;
}

}  // namespace

TEST_CASE("pre-tokenization follows GPT-2's regex") {
    using V = std::vector<std::string>;
    CHECK(pieces("Hello world") == V{"Hello", " world"});
    CHECK(pieces("don't stop") == V{"don", "'t", " stop"});
    CHECK(pieces("they're I'll") == V{"they", "'re", " I", "'ll"});
    CHECK(pieces("I'M") == V{"I", "'", "M"});  // contractions are case-sensitive: ' is a symbol, M a letter run
    CHECK(pieces("x  y") == V{"x", " ", " y"});        // a run of spaces leaves its last for the word
    CHECK(pieces("x\n\ny") == V{"x", "\n", "\n", "y"});  // \s+(?!\S) then \s+
    CHECK(pieces("end   ") == V{"end", "   "});          // trailing whitespace stays together
    CHECK(pieces("a1b22 c!!") == V{"a", "1", "b", "22", " c", "!!"});
    CHECK(pieces(" 's") == V{" '", "s"});
    CHECK(pieces("caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87") == V{"caf\xC3\xA9", " \xE4\xB8\xAD\xE6\x96\x87"});
    CHECK(pieces("a\xFF\xFE b") == V{"a", "\xFF\xFE", " b"});  // invalid bytes: "other symbols"
    CHECK(pieces("").empty());
}

TEST_CASE("GPT-2 ids: the shared reference vectors") {
    REQUIRE_VOCAB();
    CHECK(gpt2()->encode("Hello world") == std::vector<int>{15496, 995});
    CHECK(gpt2()->encode(" the quick brown fox") == std::vector<int>{262, 2068, 7586, 21831});
    CHECK(gpt2()->vocab_size() == 50257);
    CHECK(gpt2()->eot_id() == 50256);
    CHECK(gpt2()->decode({15496, 995}) == "Hello world");
}

TEST_CASE("GPT-2 ids: fixture from GPT-2's reference tokenizers") {
    REQUIRE_VOCAB();
    const std::string path = "tests/fixtures/gpt2_reference.json";
    if (!file_exists(path)) {
        MESSAGE("skipped: " << path << " missing (made by tools/gpt2_tokenizer_oracle.py)");
        return;
    }
    const Json fixture = Json::parse(read_file(path));
    CHECK(fixture.at("oracles_agree").as_bool());
    const Json& cases = fixture.at("cases");
    REQUIRE(cases.size() >= 40);
    for (size_t i = 0; i < cases.size(); ++i) {
        const std::string& text = cases[i].at("text").as_string();
        CAPTURE(text);
        std::vector<int> expected;
        const Json& ids = cases[i].at("ids");
        for (size_t k = 0; k < ids.size(); ++k) expected.push_back(int(ids[k].as_int()));
        CHECK(gpt2()->encode(text) == expected);
    }
    // The whole Brown validation text (about 300 KB): count and checksum of the id sequence.
    const std::string val_text_path = data_dir() + "/brown/brown_val.txt";
    if (!file_exists(val_text_path)) {
        MESSAGE("skipped the Brown comparison: " << val_text_path << " missing");
        return;
    }
    const std::vector<int> ids = gpt2()->encode(read_file(val_text_path));
    std::string bytes;
    for (int id : ids) {
        const uint32_t u = uint32_t(id);
        bytes.append(reinterpret_cast<const char*>(&u), 4);
    }
    const Json& brown = fixture.at("brown_val");
    CHECK(ids.size() == brown.at("count").as_uint());
    CHECK(hex64(checksum64(bytes.data(), bytes.size())) == brown.at("fnv64").as_string());
}

TEST_CASE("decode(encode(bytes)) == bytes for arbitrary bytes, invalid UTF-8 included") {
    REQUIRE_VOCAB();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (int trial = 0; trial < 200; ++trial) {
        std::string text(size_t(gen() % 64), '\0');
        for (auto& c : text) {
            // Mix ASCII, whitespace, UTF-8 lead/continuation bytes and arbitrary bytes.
            const uint64_t kind = gen() % 4;
            c = kind == 0 ? char(' ' + gen() % 95) : kind == 1 ? " \n\t"[gen() % 3] : char(gen() % 256);
        }
        CHECK(gpt2()->decode(gpt2()->encode(text)) == text);
    }
    const std::string utf8 = "naïve — 中文 😀 \xF0\x9F\x98";  // valid text then a cut 4-byte sequence
    CHECK(gpt2()->decode(gpt2()->encode(utf8)) == utf8);
    CHECK_THROWS_WITH_AS(gpt2()->decode({50257}), doctest::Contains("token id 50257 is outside"), Error);
}

TEST_CASE("tokenizer vocabulary files: malformed input is refused naming the file") {
    TempDir dir;
    write_file_atomic(dir / "vocab.bpe", "#version: 0.2\na b\n");
    write_file_atomic(dir / "encoder.json", "{\"a\": 0, \"b\": ");
    CHECK_THROWS_WITH_AS(Tokenizer::load_dir(dir.path), doctest::Contains("encoder.json: malformed JSON"), Error);
    write_file_atomic(dir / "encoder.json", "{\"a\": 0, \"b\": 0}");
    CHECK_THROWS_WITH_AS(Tokenizer::load_dir(dir.path), doctest::Contains("id 0 is used twice"), Error);
    write_file_atomic(dir / "encoder.json", "{\"a\": 0, \"b\": 5}");
    CHECK_THROWS_WITH_AS(Tokenizer::load_dir(dir.path), doctest::Contains("outside 0..1"), Error);
    write_file_atomic(dir / "encoder.json", "{\"a\": 0, \"b\": 1}");
    CHECK_THROWS_WITH_AS(Tokenizer::load_dir(dir.path), doctest::Contains("no token for byte"), Error);
    CHECK_THROWS_WITH_AS(Tokenizer::load(dir / "missing.json", dir / "vocab.bpe"), doctest::Contains("missing.json"),
                         Error);
}

TEST_CASE("the tokenize binary: text -> ids -> shard -> text") {
    REQUIRE_VOCAB();
    const std::string tokenize = bin_dir() + "/tokenize --vocab " + data_dir() + "/gpt2";
    if (!file_exists(bin_dir() + "/tokenize")) {
        MESSAGE("skipped: tokenize not built");
        return;
    }
    TempDir dir;
    const std::string text = "Hello world\n\nIt's 2026 — naïve tests, don't they?  ";
    write_file_atomic(dir / "in.txt", text);
    std::string output;
    REQUIRE(run_command(tokenize + " " + dir.path + "/in.txt", output) == 0);
    CHECK(output.rfind("15496 995 ", 0) == 0);
    write_file_atomic(dir / "ids.txt", output);
    REQUIRE(run_command(tokenize + " --decode " + dir.path + "/ids.txt", output) == 0);
    CHECK(output == text);
    REQUIRE(run_command(tokenize + " --eot --out " + dir.path + "/x.bin " + dir.path + "/in.txt", output) == 0);
    const auto shard = read_shard(dir / "x.bin", 50257);
    CHECK(shard[0] == 50256);
    REQUIRE(run_command(tokenize + " --decode " + dir.path + "/x.bin", output) == 0);
    CHECK(output == "<|endoftext|>" + text);
    CHECK(run_command("echo 1 2 99999 | " + tokenize + " --decode", output) == 1);
    CHECK(output.find("token id 99999 is outside the vocabulary") != std::string::npos);
    CHECK(run_command(tokenize + " --vocab /nonexistent " + dir.path + "/in.txt", output) == 1);
    CHECK(output.find("/nonexistent/encoder.json") != std::string::npos);
}
