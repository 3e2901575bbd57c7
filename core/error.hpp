// One exception type for every user-facing failure: a one-line message that names the
// problem (and the file or flag it came from). Binaries catch it in main, print it and
// exit non-zero; tests assert on the message.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace qopt {

struct Error : std::runtime_error {
    explicit Error(const std::string& message) : std::runtime_error(message) {}
};

template <typename... Parts>
std::string concat(const Parts&... parts) {
    std::ostringstream out;
    (out << ... << parts);
    return out.str();
}

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
    throw Error(concat(parts...));
}

#define QOPT_CHECK(cond, ...)                 \
    do {                                      \
        if (!(cond)) ::qopt::fail(__VA_ARGS__); \
    } while (0)

}  // namespace qopt
