// A small JSON value with a strict parser and a deterministic writer (object keys keep
// insertion order). Used for encoder.json, checkpoint state, safetensors headers and
// metrics lines. Numbers are kept as double plus the original integer when exact, so
// 64-bit counters (RNG state, data offsets) survive a round trip.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace qopt {

class Json {
public:
    enum class Kind { Null, Bool, Number, String, Array, Object };

    Json() = default;
    Json(std::nullptr_t) {}
    Json(bool value) : kind_(Kind::Bool), bool_(value) {}
    Json(double value) : kind_(Kind::Number), number_(value) {}
    Json(float value) : Json(double(value)) {}
    Json(int value) : Json(int64_t(value)) {}
    Json(int64_t value) : kind_(Kind::Number), number_(double(value)), integer_(value), is_integer_(true) {}
    Json(uint64_t value);
    Json(const char* value) : kind_(Kind::String), string_(value) {}
    Json(std::string value) : kind_(Kind::String), string_(std::move(value)) {}

    static Json array() { Json j; j.kind_ = Kind::Array; return j; }
    static Json object() { Json j; j.kind_ = Kind::Object; return j; }
    static Json parse(const std::string& text);  // throws qopt::Error on malformed input

    Kind kind() const { return kind_; }
    bool is_null() const { return kind_ == Kind::Null; }
    bool is_number() const { return kind_ == Kind::Number; }
    bool is_string() const { return kind_ == Kind::String; }
    bool is_object() const { return kind_ == Kind::Object; }
    bool is_array() const { return kind_ == Kind::Array; }

    // Typed access; each throws qopt::Error naming `what` when the kind is wrong.
    double as_double(const char* what = "value") const;
    int64_t as_int(const char* what = "value") const;
    uint64_t as_uint(const char* what = "value") const;
    bool as_bool(const char* what = "value") const;
    const std::string& as_string(const char* what = "value") const;

    // Arrays
    void push_back(Json value);
    size_t size() const;
    const Json& operator[](size_t index) const;

    // Objects
    Json& operator[](const std::string& key);  // inserts when missing (object or null only)
    const Json& at(const std::string& key) const;  // throws qopt::Error when missing
    bool contains(const std::string& key) const;
    const std::vector<std::pair<std::string, Json>>& items() const { return members_; }
    // Appends without looking for an existing key (the parser's O(1) path).
    void append_member(std::string key, Json value);

    std::string dump() const;  // compact, one line

private:
    void dump_to(std::string& out) const;
    Kind kind_ = Kind::Null;
    bool bool_ = false;
    double number_ = 0;
    int64_t integer_ = 0;
    uint64_t unsigned_ = 0;
    bool is_integer_ = false;
    bool is_unsigned_ = false;
    std::string string_;
    std::vector<Json> elements_;
    std::vector<std::pair<std::string, Json>> members_;
};

// Appends `text` to `out` as a JSON string literal (quotes and escapes included).
void json_escape(const std::string& text, std::string& out);

}  // namespace qopt
