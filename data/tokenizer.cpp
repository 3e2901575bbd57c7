#include "data/tokenizer.hpp"

#include <algorithm>
#include <climits>

#include "core/error.hpp"
#include "core/files.hpp"
#include "core/json.hpp"

namespace qopt {

namespace {

struct CodepointRange {
    uint32_t first, last;
};
#include "data/unicode_tables.inc"

template <size_t N>
bool in_ranges(const CodepointRange (&ranges)[N], uint32_t cp) {
    size_t lo = 0, hi = N;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ranges[mid].last < cp) lo = mid + 1;
        else hi = mid;
    }
    return lo < N && ranges[lo].first <= cp;
}

// Code point used for a byte that is not part of valid UTF-8: outside Unicode, so it is
// neither a letter, a number nor a space ("other symbol", like GPT-2 would see U+FFFD).
constexpr uint32_t kInvalidByte = 0x110000;

enum class CharClass : uint8_t { Letter, Number, Space, Other };

CharClass classify(uint32_t cp) {
    if (cp < 0x80) {
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return CharClass::Letter;
        if (cp >= '0' && cp <= '9') return CharClass::Number;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return CharClass::Space;
        return CharClass::Other;
    }
    if (cp >= kInvalidByte) return CharClass::Other;
    // Unicode White_Space property (what \s means in GPT-2's regex).
    if (cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
        cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000)
        return CharClass::Space;
    if (in_ranges(kLetterRanges, cp)) return CharClass::Letter;
    if (in_ranges(kNumberRanges, cp)) return CharClass::Number;
    return CharClass::Other;
}

// One decoded character: its code point, class and byte span in the text.
struct Char {
    uint32_t cp;
    uint32_t start;
    CharClass cls;
};

// Decodes UTF-8 strictly (no overlongs, no surrogates, at most U+10FFFF); every byte
// that does not start a valid sequence becomes one kInvalidByte character.
void decode_utf8(std::string_view text, std::vector<Char>& chars) {
    chars.clear();
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    size_t n = text.size(), i = 0;
    while (i < n) {
        unsigned char c = s[i];
        uint32_t cp = kInvalidByte;
        size_t len = 1;
        if (c < 0x80) {
            cp = c;
        } else {
            size_t need = 0;
            uint32_t min_cp = 0;
            if ((c & 0xE0) == 0xC0) need = 1, cp = c & 0x1F, min_cp = 0x80;
            else if ((c & 0xF0) == 0xE0) need = 2, cp = c & 0x0F, min_cp = 0x800;
            else if ((c & 0xF8) == 0xF0) need = 3, cp = c & 0x07, min_cp = 0x10000;
            bool ok = need > 0;
            if (ok) {
                for (size_t k = 1; k <= need; ++k) {
                    if (i + k >= n || (s[i + k] & 0xC0) != 0x80) {
                        ok = false;
                        break;
                    }
                    cp = (cp << 6) | (s[i + k] & 0x3F);
                }
            }
            if (ok && (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) ok = false;
            if (ok) len = need + 1;
            else cp = kInvalidByte;
        }
        chars.push_back({cp, uint32_t(i), classify(cp)});
        i += len;
    }
}

}  // namespace

// The scanner tries GPT-2's alternatives in order at each position; the first that matches
// gives the piece. Whitespace: a run followed by a non-space gives all but its last char
// (the last joins the next piece as its optional leading space only when it is ' ').
std::vector<std::string_view> pretokenize(std::string_view text) {
    std::vector<Char> chars;
    decode_utf8(text, chars);
    const size_t n = chars.size();
    auto byte_at = [&](size_t index) { return index < n ? chars[index].start : uint32_t(text.size()); };
    auto is = [&](size_t index, CharClass cls) { return index < n && chars[index].cls == cls; };
    auto cp_at = [&](size_t index) { return index < n ? chars[index].cp : 0u; };

    std::vector<std::string_view> pieces;
    size_t i = 0;
    while (i < n) {
        size_t end = i;
        // 's 't 're 've 'm 'll 'd
        if (cp_at(i) == '\'') {
            uint32_t a = cp_at(i + 1), b = cp_at(i + 2);
            if (a == 's' || a == 't' || a == 'm' || a == 'd') end = i + 2;
            else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) end = i + 3;
        }
        // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+'
        if (end == i) {
            size_t j = i + (cp_at(i) == ' ' ? 1 : 0);
            for (CharClass cls : {CharClass::Letter, CharClass::Number, CharClass::Other}) {
                if (is(j, cls)) {
                    size_t k = j;
                    while (is(k, cls)) ++k;
                    end = k;
                    break;
                }
            }
        }
        // '\s+(?!\S)' then '\s+'
        if (end == i && is(i, CharClass::Space)) {
            size_t k = i;
            while (is(k, CharClass::Space)) ++k;
            if (k == n || k - 1 == i) end = k;
            else end = k - 1;
        }
        if (end == i) end = i + 1;  // unreachable: every class is covered above
        pieces.emplace_back(text.substr(byte_at(i), byte_at(end) - byte_at(i)));
        i = end;
    }
    return pieces;
}

// GPT-2 maps each byte to a printable character so that vocab entries are text: bytes
// that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves, the other
// 68 bytes to U+0100, U+0101, ... in byte order.
static void byte_to_unicode(uint32_t table[256]) {
    int next = 0;
    for (int b = 0; b < 256; ++b) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        table[b] = printable ? uint32_t(b) : uint32_t(256 + next++);
    }
}

Tokenizer Tokenizer::load_dir(const std::string& directory) {
    return load(directory + "/encoder.json", directory + "/vocab.bpe");
}

Tokenizer Tokenizer::load(const std::string& encoder_json_path, const std::string& vocab_bpe_path) {
    const std::string encoder_text = read_file(encoder_json_path);  // errors name the path already
    return parse(encoder_text, read_file(vocab_bpe_path), encoder_json_path, vocab_bpe_path);
}

Tokenizer Tokenizer::parse(const std::string& encoder_text, const std::string& merges_text,
                           const std::string& encoder_json_path, const std::string& vocab_bpe_path) {
    Tokenizer tok;
    uint32_t b2u[256];
    byte_to_unicode(b2u);
    std::unordered_map<uint32_t, int> unicode_to_byte;
    for (int b = 0; b < 256; ++b) unicode_to_byte[b2u[b]] = b;

    Json encoder;
    try {
        encoder = Json::parse(encoder_text);
    } catch (const Error& e) {
        fail(encoder_json_path, ": ", e.what());
    }
    if (!encoder.is_object() || encoder.size() == 0)
        fail(encoder_json_path, ": expected a non-empty JSON object of token -> id");
    const size_t vocab = encoder.size();
    tok.token_bytes_.assign(vocab, std::string());
    std::vector<bool> seen(vocab, false);
    std::unordered_map<std::string, int> id_of;
    id_of.reserve(vocab * 2);
    std::vector<Char> chars;
    for (const auto& [token, value] : encoder.items()) {
        if (!value.is_number()) fail(encoder_json_path, ": id of token '", token, "' is not a number");
        int64_t id = value.as_int("token id");
        if (id < 0 || size_t(id) >= vocab)
            fail(encoder_json_path, ": id ", id, " of token '", token, "' is outside 0..", vocab - 1);
        if (seen[size_t(id)]) fail(encoder_json_path, ": id ", id, " is used twice");
        seen[size_t(id)] = true;
        id_of.emplace(token, int(id));
        if (token == "<|endoftext|>") {
            tok.eot_id_ = int(id);
            tok.token_bytes_[size_t(id)] = token;
            continue;
        }
        // Token text -> raw bytes through the inverse byte map.
        decode_utf8(token, chars);
        std::string bytes;
        for (const Char& c : chars) {
            auto it = unicode_to_byte.find(c.cp);
            if (it == unicode_to_byte.end())
                fail(encoder_json_path, ": token '", token, "' has a character outside GPT-2's byte alphabet");
            bytes += char(it->second);
        }
        tok.token_bytes_[size_t(id)] = bytes;
    }
    for (int b = 0; b < 256; ++b) {
        std::string key;  // b2u[b] as UTF-8 (all below U+0800)
        uint32_t cp = b2u[b];
        if (cp < 0x80) key += char(cp);
        else key += char(0xC0 | (cp >> 6)), key += char(0x80 | (cp & 0x3F));
        auto it = id_of.find(key);
        if (it == id_of.end()) fail(encoder_json_path, ": no token for byte ", b);
        tok.byte_ids_[b] = it->second;
    }

    size_t pos = 0;
    int rank = 0, line_number = 0;
    while (pos < merges_text.size()) {
        size_t eol = merges_text.find('\n', pos);
        if (eol == std::string::npos) eol = merges_text.size();
        std::string line = merges_text.substr(pos, eol - pos);
        pos = eol + 1;
        ++line_number;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty() || (line_number == 1 && line.rfind("#version", 0) == 0)) continue;
        size_t space = line.find(' ');
        if (space == std::string::npos || space == 0 || space + 1 == line.size() ||
            line.find(' ', space + 1) != std::string::npos)
            fail(vocab_bpe_path, ":", line_number, ": expected two tokens separated by one space");
        std::string left = line.substr(0, space), right = line.substr(space + 1);
        auto l = id_of.find(left), r = id_of.find(right), m = id_of.find(left + right);
        if (l == id_of.end() || r == id_of.end() || m == id_of.end())
            fail(vocab_bpe_path, ":", line_number, ": merge '", line, "' uses a token missing from ",
                 encoder_json_path);
        uint64_t key = (uint64_t(uint32_t(l->second)) << 32) | uint32_t(r->second);
        tok.merges_.emplace(key, std::make_pair(rank++, m->second));
    }
    if (rank == 0) fail(vocab_bpe_path, ": no merges found");
    return tok;
}

void Tokenizer::encode_piece(std::string_view piece, std::vector<int>& out) const {
    auto cached = cache_.find(std::string(piece));
    if (cached != cache_.end()) {
        out.insert(out.end(), cached->second.begin(), cached->second.end());
        return;
    }
    std::vector<int> word;
    word.reserve(piece.size());
    for (unsigned char b : piece) word.push_back(byte_ids_[b]);
    // Repeatedly merge every occurrence of the lowest-ranked adjacent pair.
    while (word.size() > 1) {
        int best_rank = INT_MAX, best_left = -1, best_right = -1, merged = -1;
        for (size_t i = 0; i + 1 < word.size(); ++i) {
            auto it = merges_.find((uint64_t(uint32_t(word[i])) << 32) | uint32_t(word[i + 1]));
            if (it != merges_.end() && it->second.first < best_rank) {
                best_rank = it->second.first;
                best_left = word[i];
                best_right = word[i + 1];
                merged = it->second.second;
            }
        }
        if (merged < 0) break;
        size_t write = 0;
        for (size_t read = 0; read < word.size();) {
            if (read + 1 < word.size() && word[read] == best_left && word[read + 1] == best_right) {
                word[write++] = merged;
                read += 2;
            } else {
                word[write++] = word[read++];
            }
        }
        word.resize(write);
    }
    out.insert(out.end(), word.begin(), word.end());
    if (cache_.size() > (1u << 20)) cache_.clear();
    cache_.emplace(std::string(piece), std::move(word));
}

std::vector<int> Tokenizer::encode(std::string_view text) const {
    std::vector<int> ids;
    ids.reserve(text.size() / 3 + 1);
    for (std::string_view piece : pretokenize(text)) encode_piece(piece, ids);
    return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
    std::string text;
    for (int id : ids) {
        if (id < 0 || id >= vocab_size()) fail("token id ", id, " is outside the vocabulary 0..", vocab_size() - 1);
        text += token_bytes_[size_t(id)];
    }
    return text;
}

}  // namespace qopt
