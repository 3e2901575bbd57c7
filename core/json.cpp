#include "core/json.hpp"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.hpp"

namespace qopt {

Json::Json(uint64_t value) : kind_(Kind::Number), number_(double(value)) {
    if (value <= uint64_t(INT64_MAX)) {
        integer_ = int64_t(value);
        is_integer_ = true;
    } else {
        unsigned_ = value;
        is_unsigned_ = true;
    }
}

static const char* kind_name(Json::Kind kind) {
    switch (kind) {
        case Json::Kind::Null: return "null";
        case Json::Kind::Bool: return "a boolean";
        case Json::Kind::Number: return "a number";
        case Json::Kind::String: return "a string";
        case Json::Kind::Array: return "an array";
        case Json::Kind::Object: return "an object";
    }
    return "?";
}

double Json::as_double(const char* what) const {
    QOPT_CHECK(kind_ == Kind::Number, what, " must be a number, got ", kind_name(kind_));
    return number_;
}

int64_t Json::as_int(const char* what) const {
    QOPT_CHECK(kind_ == Kind::Number && is_integer_, what, " must be an integer, got ",
               kind_ == Kind::Number ? "a fractional or huge number" : kind_name(kind_));
    return integer_;
}

uint64_t Json::as_uint(const char* what) const {
    if (kind_ == Kind::Number && is_unsigned_) return unsigned_;
    int64_t v = as_int(what);
    QOPT_CHECK(v >= 0, what, " must be non-negative, got ", v);
    return uint64_t(v);
}

bool Json::as_bool(const char* what) const {
    QOPT_CHECK(kind_ == Kind::Bool, what, " must be a boolean, got ", kind_name(kind_));
    return bool_;
}

const std::string& Json::as_string(const char* what) const {
    QOPT_CHECK(kind_ == Kind::String, what, " must be a string, got ", kind_name(kind_));
    return string_;
}

void Json::push_back(Json value) {
    if (kind_ == Kind::Null) kind_ = Kind::Array;
    QOPT_CHECK(kind_ == Kind::Array, "push_back on JSON ", kind_name(kind_));
    elements_.push_back(std::move(value));
}

size_t Json::size() const {
    if (kind_ == Kind::Array) return elements_.size();
    if (kind_ == Kind::Object) return members_.size();
    return 0;
}

const Json& Json::operator[](size_t index) const {
    QOPT_CHECK(kind_ == Kind::Array && index < elements_.size(), "JSON array index ", index,
               " out of range");
    return elements_[index];
}

Json& Json::operator[](const std::string& key) {
    if (kind_ == Kind::Null) kind_ = Kind::Object;
    QOPT_CHECK(kind_ == Kind::Object, "key '", key, "' on JSON ", kind_name(kind_));
    for (auto& member : members_)
        if (member.first == key) return member.second;
    members_.emplace_back(key, Json());
    return members_.back().second;
}

const Json& Json::at(const std::string& key) const {
    QOPT_CHECK(kind_ == Kind::Object, "expected a JSON object holding '", key, "', got ",
               kind_name(kind_));
    for (const auto& member : members_)
        if (member.first == key) return member.second;
    fail("missing JSON field '", key, "'");
}

void Json::append_member(std::string key, Json value) {
    if (kind_ == Kind::Null) kind_ = Kind::Object;
    QOPT_CHECK(kind_ == Kind::Object, "key '", key, "' on JSON ", kind_name(kind_));
    members_.emplace_back(std::move(key), std::move(value));
}

bool Json::contains(const std::string& key) const {
    if (kind_ != Kind::Object) return false;
    for (const auto& member : members_)
        if (member.first == key) return true;
    return false;
}

// ---------------------------------------------------------------- writer

void json_escape(const std::string& text, std::string& out) {
    out += '"';
    for (unsigned char c : text) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += char(c);
                }
        }
    }
    out += '"';
}

void Json::dump_to(std::string& out) const {
    switch (kind_) {
        case Kind::Null: out += "null"; break;
        case Kind::Bool: out += bool_ ? "true" : "false"; break;
        case Kind::Number: {
            if (is_integer_) {
                out += std::to_string(integer_);
            } else if (is_unsigned_) {
                out += std::to_string(unsigned_);
            } else if (!std::isfinite(number_)) {
                out += "null";  // JSON has no NaN/Inf; readers see a missing value
            } else {
                // The shortest of 15 or 17 significant digits that reads back as the same double.
                char buf[32];
                std::snprintf(buf, sizeof buf, "%.15g", number_);
                if (std::strtod(buf, nullptr) != number_) std::snprintf(buf, sizeof buf, "%.17g", number_);
                out += buf;
            }
            break;
        }
        case Kind::String: json_escape(string_, out); break;
        case Kind::Array: {
            out += '[';
            for (size_t i = 0; i < elements_.size(); ++i) {
                if (i) out += ',';
                elements_[i].dump_to(out);
            }
            out += ']';
            break;
        }
        case Kind::Object: {
            out += '{';
            for (size_t i = 0; i < members_.size(); ++i) {
                if (i) out += ',';
                json_escape(members_[i].first, out);
                out += ':';
                members_[i].second.dump_to(out);
            }
            out += '}';
            break;
        }
    }
}

std::string Json::dump() const {
    std::string out;
    dump_to(out);
    return out;
}

// ---------------------------------------------------------------- parser

namespace {

struct Parser {
    const std::string& text;
    size_t pos = 0;
    int depth = 0;

    [[noreturn]] void error(const char* what) const {
        fail("malformed JSON at byte ", pos, ": ", what);
    }
    void skip_space() {
        while (pos < text.size() &&
               (text[pos] == ' ' || text[pos] == '\n' || text[pos] == '\r' || text[pos] == '\t'))
            ++pos;
    }
    bool consume(char c) {
        skip_space();
        if (pos < text.size() && text[pos] == c) {
            ++pos;
            return true;
        }
        return false;
    }
    void expect(char c) {
        if (!consume(c)) {
            char msg[32];
            std::snprintf(msg, sizeof msg, "expected '%c'", c);
            error(msg);
        }
    }
    static void append_utf8(uint32_t cp, std::string& out) {
        if (cp < 0x80) {
            out += char(cp);
        } else if (cp < 0x800) {
            out += char(0xC0 | (cp >> 6));
            out += char(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += char(0xE0 | (cp >> 12));
            out += char(0x80 | ((cp >> 6) & 0x3F));
            out += char(0x80 | (cp & 0x3F));
        } else {
            out += char(0xF0 | (cp >> 18));
            out += char(0x80 | ((cp >> 12) & 0x3F));
            out += char(0x80 | ((cp >> 6) & 0x3F));
            out += char(0x80 | (cp & 0x3F));
        }
    }
    uint32_t hex4() {
        if (pos + 4 > text.size()) error("truncated \\u escape");
        uint32_t value = 0;
        for (int i = 0; i < 4; ++i) {
            char c = text[pos++];
            value <<= 4;
            if (c >= '0' && c <= '9') value |= uint32_t(c - '0');
            else if (c >= 'a' && c <= 'f') value |= uint32_t(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') value |= uint32_t(c - 'A' + 10);
            else error("bad hex digit in \\u escape");
        }
        return value;
    }
    std::string string_literal() {
        skip_space();
        if (pos >= text.size() || text[pos] != '"') error("expected a string");
        ++pos;
        std::string out;
        while (true) {
            if (pos >= text.size()) error("unterminated string");
            char c = text[pos++];
            if (c == '"') break;
            if (static_cast<unsigned char>(c) < 0x20) error("control character in string");
            if (c != '\\') {
                out += c;
                continue;
            }
            if (pos >= text.size()) error("unterminated escape");
            char e = text[pos++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp = hex4();
                    // A high surrogate followed by a low one encodes one code point.
                    if (cp >= 0xD800 && cp < 0xDC00 && pos + 6 <= text.size() &&
                        text[pos] == '\\' && text[pos + 1] == 'u') {
                        size_t save = pos;
                        pos += 2;
                        uint32_t low = hex4();
                        if (low >= 0xDC00 && low < 0xE000)
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                        else
                            pos = save;
                    }
                    append_utf8(cp, out);
                    break;
                }
                default: error("unknown escape");
            }
        }
        return out;
    }
    Json number() {
        size_t start = pos;
        if (text[pos] == '-') ++pos;
        bool integral = true;
        auto digits = [&] {
            size_t d = pos;
            while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') ++pos;
            if (pos == d) error("expected digits");
        };
        digits();
        if (pos < text.size() && text[pos] == '.') {
            integral = false;
            ++pos;
            digits();
        }
        if (pos < text.size() && (text[pos] == 'e' || text[pos] == 'E')) {
            integral = false;
            ++pos;
            if (pos < text.size() && (text[pos] == '+' || text[pos] == '-')) ++pos;
            digits();
        }
        std::string token = text.substr(start, pos - start);
        if (integral) {
            errno = 0;
            if (token[0] == '-') {
                long long v = std::strtoll(token.c_str(), nullptr, 10);
                if (errno == 0) return Json(int64_t(v));
            } else {
                unsigned long long v = std::strtoull(token.c_str(), nullptr, 10);
                if (errno == 0) return Json(uint64_t(v));
            }
        }
        return Json(std::strtod(token.c_str(), nullptr));
    }
    Json value() {
        if (++depth > 256) error("nesting too deep");
        skip_space();
        if (pos >= text.size()) error("unexpected end of input");
        char c = text[pos];
        Json result;
        if (c == '{') {
            ++pos;
            result = Json::object();
            if (!consume('}')) {
                do {
                    std::string key = string_literal();
                    expect(':');
                    result.append_member(std::move(key), value());
                } while (consume(','));
                expect('}');
            }
        } else if (c == '[') {
            ++pos;
            result = Json::array();
            if (!consume(']')) {
                do {
                    result.push_back(value());
                } while (consume(','));
                expect(']');
            }
        } else if (c == '"') {
            result = Json(string_literal());
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            result = number();
        } else if (text.compare(pos, 4, "true") == 0) {
            pos += 4;
            result = Json(true);
        } else if (text.compare(pos, 5, "false") == 0) {
            pos += 5;
            result = Json(false);
        } else if (text.compare(pos, 4, "null") == 0) {
            pos += 4;
        } else {
            error("unexpected character");
        }
        --depth;
        return result;
    }
};

}  // namespace

Json Json::parse(const std::string& text) {
    Parser parser{text};
    Json result = parser.value();
    parser.skip_space();
    if (parser.pos != text.size()) parser.error("trailing characters");
    return result;
}

}  // namespace qopt
