// npcforge_json.hpp: the small JSON value, reader and writer of the npcforge C++ client (header-only, C++17).
//
// Input: a JSON text (one protocol line), UTF-8. Output: npcforge::Json, a tree of null / bool / int64 /
// double / string (UTF-8) / array / object (insertion-ordered key-value pairs). Json::dump() writes compact
// JSON back. \uXXXX escapes, surrogate pairs included, decode to UTF-8; a lone surrogate becomes U+FFFD.
// dump() refuses strings that are not valid UTF-8 (the server would reject the whole line). Numbers are read
// and written in the "C" locale, whatever locale the game has set.
#pragma once

#include <cstdint>
#include <cstdio>
#include <limits>
#include <locale>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace npcforge {

struct JsonError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

class Json {
public:
    enum class Type { Null, Bool, Int, Double, String, Array, Object };
    using Array = std::vector<Json>;
    using Object = std::vector<std::pair<std::string, Json>>;

    Json() = default;
    Json(std::nullptr_t) {}
    Json(bool b) : type_(Type::Bool), bool_(b) {}
    Json(int i) : type_(Type::Int), int_(i) {}
    Json(long i) : type_(Type::Int), int_(i) {}
    Json(long long i) : type_(Type::Int), int_(i) {}
    Json(unsigned i) : type_(Type::Int), int_(i) {}
    Json(unsigned long i) : type_(Type::Int), int_(static_cast<int64_t>(i)) {}
    Json(unsigned long long i) : type_(Type::Int), int_(static_cast<int64_t>(i)) {}
    Json(double d) : type_(Type::Double), double_(d) {}
    Json(const char* s) : type_(Type::String), string_(s) {}
    Json(std::string s) : type_(Type::String), string_(std::move(s)) {}
    Json(std::string_view s) : type_(Type::String), string_(s) {}
    Json(Array a) : type_(Type::Array), array_(std::move(a)) {}
    Json(Object o) : type_(Type::Object), object_(std::move(o)) {}

    static Json object() { return Json(Object{}); }
    static Json array() { return Json(Array{}); }

    Type type() const { return type_; }
    bool is_null() const { return type_ == Type::Null; }
    bool is_bool() const { return type_ == Type::Bool; }
    bool is_int() const { return type_ == Type::Int; }
    bool is_number() const { return type_ == Type::Int || type_ == Type::Double; }
    bool is_string() const { return type_ == Type::String; }
    bool is_array() const { return type_ == Type::Array; }
    bool is_object() const { return type_ == Type::Object; }

    bool as_bool() const { expect(Type::Bool, "a boolean"); return bool_; }
    int64_t as_int() const {
        if (type_ == Type::Double && double_ >= -9.2e18 && double_ <= 9.2e18 &&
            double_ == static_cast<double>(static_cast<int64_t>(double_)))
            return static_cast<int64_t>(double_);
        expect(Type::Int, "an integer");
        return int_;
    }
    double as_double() const {
        if (type_ == Type::Int) return static_cast<double>(int_);
        expect(Type::Double, "a number");
        return double_;
    }
    const std::string& as_string() const { expect(Type::String, "a string"); return string_; }
    const Array& as_array() const { expect(Type::Array, "an array"); return array_; }
    Array& as_array() { expect(Type::Array, "an array"); return array_; }
    const Object& as_object() const { expect(Type::Object, "an object"); return object_; }

    // Object access. find() gives nullptr for a missing key; at() throws naming the key.
    const Json* find(std::string_view key) const {
        if (type_ != Type::Object) return nullptr;
        for (const auto& kv : object_)
            if (kv.first == key) return &kv.second;
        return nullptr;
    }
    bool contains(std::string_view key) const { return find(key) != nullptr; }
    const Json& at(std::string_view key) const {
        const Json* v = find(key);
        if (!v) throw JsonError("missing field '" + std::string(key) + "'");
        return *v;
    }
    // Inserts (or replaces) a field; turns a null value into an object first.
    Json& operator[](std::string_view key) {
        if (type_ == Type::Null) type_ = Type::Object;
        expect(Type::Object, "an object");
        for (auto& kv : object_)
            if (kv.first == key) return kv.second;
        object_.emplace_back(std::string(key), Json());
        return object_.back().second;
    }
    void push_back(Json v) {
        if (type_ == Type::Null) type_ = Type::Array;
        expect(Type::Array, "an array");
        array_.push_back(std::move(v));
    }

    bool operator==(const Json& o) const {
        if (is_number() && o.is_number() && (type_ == Type::Double || o.type_ == Type::Double))
            return as_double() == o.as_double();
        if (type_ != o.type_) return false;
        switch (type_) {
            case Type::Null: return true;
            case Type::Bool: return bool_ == o.bool_;
            case Type::Int: return int_ == o.int_;
            case Type::Double: return double_ == o.double_;
            case Type::String: return string_ == o.string_;
            case Type::Array: return array_ == o.array_;
            case Type::Object: return object_ == o.object_;
        }
        return false;
    }
    bool operator!=(const Json& o) const { return !(*this == o); }

    std::string dump() const {
        std::string out;
        dump_to(out, 0);
        return out;
    }

    static Json parse(std::string_view text) {
        Parser p{text, 0};
        p.skip_ws();
        Json v = p.value(0);
        p.skip_ws();
        if (p.pos != text.size()) p.fail("unexpected text after the JSON value");
        return v;
    }

    // Appends s to out as a JSON string literal; UTF-8 passes through raw, control characters are escaped.
    static void write_string(std::string& out, std::string_view s) {
        static const char* hex = "0123456789abcdef";
        out += '"';
        for (size_t i = 0; i < s.size(); ++i) {
            unsigned char c = static_cast<unsigned char>(s[i]);
            switch (c) {
                case '"': out += "\\\""; break;
                case '\\': out += "\\\\"; break;
                case '\b': out += "\\b"; break;
                case '\f': out += "\\f"; break;
                case '\n': out += "\\n"; break;
                case '\r': out += "\\r"; break;
                case '\t': out += "\\t"; break;
                default:
                    if (c < 0x20) {
                        out += "\\u00";
                        out += hex[c >> 4];
                        out += hex[c & 15];
                    } else if (c < 0x80) {
                        out += static_cast<char>(c);
                    } else {
                        size_t n = utf8_sequence_length(s, i);
                        if (n == 0) throw JsonError("string is not valid UTF-8 (byte " + std::to_string(i) + ")");
                        out.append(s.data() + i, n);
                        i += n - 1;
                    }
            }
        }
        out += '"';
    }

private:
    // Nesting deeper than this is refused rather than risking a stack overflow on hostile input.
    static constexpr int kMaxDepth = 128;

    Type type_ = Type::Null;
    bool bool_ = false;
    int64_t int_ = 0;
    double double_ = 0;
    std::string string_;
    Array array_;
    Object object_;

    void expect(Type t, const char* what) const {
        if (type_ != t) throw JsonError(std::string("JSON value is not ") + what);
    }

    // Length of the valid UTF-8 sequence starting at s[i] (a lead byte >= 0x80), or 0 when invalid.
    static size_t utf8_sequence_length(std::string_view s, size_t i) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        size_t n;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) { n = 2; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { n = 3; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { n = 4; cp = c & 0x07; }
        else return 0;
        if (i + n > s.size()) return 0;
        for (size_t k = 1; k < n; ++k) {
            unsigned char cc = static_cast<unsigned char>(s[i + k]);
            if ((cc & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (cc & 0x3F);
        }
        // Overlong forms, UTF-16 surrogates and code points past U+10FFFF are not valid UTF-8.
        if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        return n;
    }

    static void append_utf8(std::string& out, uint32_t cp) {
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    static std::string format_double(double d) {
        if (d != d || d == std::numeric_limits<double>::infinity() || d == -std::numeric_limits<double>::infinity())
            throw JsonError("JSON has no NaN or Infinity");
        // The shortest of 15 or 17 significant digits that reads back to the same double.
        for (int precision : {15, 17}) {
            std::ostringstream os;
            os.imbue(std::locale::classic());
            os.precision(precision);
            os << d;
            std::string s = os.str();
            if (precision == 17 || read_double(s) == d) {
                if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // keep it a JSON float
                return s;
            }
        }
        return {};
    }

    static double read_double(const std::string& s) {
        std::istringstream is(s);
        is.imbue(std::locale::classic());
        double d = 0;
        is >> d;
        return d;
    }

    void dump_to(std::string& out, int depth) const {
        if (depth > kMaxDepth) throw JsonError("JSON value nested too deeply");
        switch (type_) {
            case Type::Null: out += "null"; break;
            case Type::Bool: out += bool_ ? "true" : "false"; break;
            case Type::Int: out += std::to_string(int_); break;
            case Type::Double: out += format_double(double_); break;
            case Type::String: write_string(out, string_); break;
            case Type::Array:
                out += '[';
                for (size_t i = 0; i < array_.size(); ++i) {
                    if (i) out += ',';
                    array_[i].dump_to(out, depth + 1);
                }
                out += ']';
                break;
            case Type::Object:
                out += '{';
                for (size_t i = 0; i < object_.size(); ++i) {
                    if (i) out += ',';
                    write_string(out, object_[i].first);
                    out += ':';
                    object_[i].second.dump_to(out, depth + 1);
                }
                out += '}';
                break;
        }
    }

    struct Parser {
        std::string_view text;
        size_t pos;

        [[noreturn]] void fail(const std::string& message) const {
            throw JsonError("invalid JSON at byte " + std::to_string(pos) + ": " + message);
        }

        void skip_ws() {
            while (pos < text.size()) {
                char c = text[pos];
                if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
                ++pos;
            }
        }

        void literal(std::string_view word) {
            if (text.substr(pos, word.size()) != word) fail("expected " + std::string(word));
            pos += word.size();
        }

        Json value(int depth) {
            if (depth > kMaxDepth) fail("nested too deeply");
            if (pos >= text.size()) fail("unexpected end of text");
            char c = text[pos];
            if (c == '{') return object(depth);
            if (c == '[') return array(depth);
            if (c == '"') return Json(string());
            if (c == 't') { literal("true"); return Json(true); }
            if (c == 'f') { literal("false"); return Json(false); }
            if (c == 'n') { literal("null"); return Json(); }
            if (c == '-' || (c >= '0' && c <= '9')) return number();
            fail(std::string("unexpected character '") + c + "'");
        }

        Json object(int depth) {
            Json result = Json::object();
            ++pos;  // '{'
            skip_ws();
            if (pos < text.size() && text[pos] == '}') { ++pos; return result; }
            while (true) {
                skip_ws();
                if (pos >= text.size() || text[pos] != '"') fail("expected a string key");
                std::string key = string();
                skip_ws();
                if (pos >= text.size() || text[pos] != ':') fail("expected ':'");
                ++pos;
                skip_ws();
                result[key] = value(depth + 1);
                skip_ws();
                if (pos >= text.size()) fail("unterminated object");
                if (text[pos] == ',') { ++pos; continue; }
                if (text[pos] == '}') { ++pos; return result; }
                fail("expected ',' or '}'");
            }
        }

        Json array(int depth) {
            Json result = Json::array();
            ++pos;  // '['
            skip_ws();
            if (pos < text.size() && text[pos] == ']') { ++pos; return result; }
            while (true) {
                skip_ws();
                result.push_back(value(depth + 1));
                skip_ws();
                if (pos >= text.size()) fail("unterminated array");
                if (text[pos] == ',') { ++pos; continue; }
                if (text[pos] == ']') { ++pos; return result; }
                fail("expected ',' or ']'");
            }
        }

        uint32_t hex4() {
            if (pos + 4 > text.size()) fail("truncated \\u escape");
            uint32_t v = 0;
            for (int i = 0; i < 4; ++i) {
                char h = text[pos++];
                int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10
                      : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
                if (d < 0) fail("bad hex digit in \\u escape");
                v = v * 16 + static_cast<uint32_t>(d);
            }
            return v;
        }

        std::string string() {
            ++pos;  // opening quote
            std::string out;
            while (true) {
                if (pos >= text.size()) fail("unterminated string");
                unsigned char c = static_cast<unsigned char>(text[pos++]);
                if (c == '"') return out;
                if (c < 0x20) fail("raw control character in string");
                if (c != '\\') { out += static_cast<char>(c); continue; }
                if (pos >= text.size()) fail("unterminated escape");
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
                        if (cp >= 0xD800 && cp <= 0xDBFF && text.substr(pos, 2) == "\\u") {
                            size_t back = pos;
                            pos += 2;
                            uint32_t low = hex4();
                            if (low >= 0xDC00 && low <= 0xDFFF) cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                            else pos = back;  // not a pair: the next escape is read on its own
                        }
                        if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;  // a lone surrogate has no UTF-8 form
                        append_utf8(out, cp);
                        break;
                    }
                    default: fail(std::string("bad escape \\") + e);
                }
            }
        }

        Json number() {
            size_t start = pos;
            auto digits = [&] { while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') ++pos; };
            auto is_digit = [&] { return pos < text.size() && text[pos] >= '0' && text[pos] <= '9'; };
            if (text[pos] == '-') ++pos;
            if (pos < text.size() && text[pos] == '0') ++pos;
            else if (is_digit()) digits();
            else fail("bad number");
            bool integral = true;
            if (pos < text.size() && text[pos] == '.') {
                integral = false;
                ++pos;
                if (!is_digit()) fail("digit expected after '.'");
                digits();
            }
            if (pos < text.size() && (text[pos] == 'e' || text[pos] == 'E')) {
                integral = false;
                ++pos;
                if (pos < text.size() && (text[pos] == '+' || text[pos] == '-')) ++pos;
                if (!is_digit()) fail("digit expected in exponent");
                digits();
            }
            std::string literal(text.substr(start, pos - start));
            if (integral) {
                // Accumulate with an overflow check; integers beyond int64 fall back to double.
                bool negative = literal[0] == '-';
                uint64_t magnitude = 0;
                bool overflow = false;
                for (size_t i = negative ? 1 : 0; i < literal.size() && !overflow; ++i) {
                    uint64_t d = static_cast<uint64_t>(literal[i] - '0');
                    if (magnitude > (std::numeric_limits<uint64_t>::max() - d) / 10) overflow = true;
                    else magnitude = magnitude * 10 + d;
                }
                uint64_t limit = negative ? uint64_t(std::numeric_limits<int64_t>::max()) + 1
                                          : uint64_t(std::numeric_limits<int64_t>::max());
                if (!overflow && magnitude <= limit)
                    return Json(static_cast<long long>(negative ? 0 - magnitude : magnitude));
            }
            return Json(read_double(literal));
        }
    };
};

}  // namespace npcforge
