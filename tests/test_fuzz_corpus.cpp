// The fuzz corpus as regression tests: every kept input (tests/fuzz/corpus/<target>/, seeds and
// inputs that once crashed a parser) goes through its parser again, which must accept it or
// refuse it with a qopt::Error. `make fuzz` finds new inputs; see tests/fuzz/fuzz_targets.hpp.
#include <exception>

#include "core/files.hpp"
#include "helpers.hpp"
#include "tests/fuzz/fuzz_targets.hpp"

using namespace qopt;
using namespace qopt::test;

TEST_CASE("fuzz corpus: every kept input is accepted or refused with a clear error by its parser") {
    const std::string root = "tests/fuzz/corpus";
    if (!is_directory(root)) {
        MESSAGE("skipped: " << root << " not found (run from the repository root)");
        return;
    }
    size_t inputs = 0;
    for (const fuzz::Target& target : fuzz::targets()) {
        const auto names = list_directory(root + "/" + target.name);
        CHECK_MESSAGE(!names.empty(), "no corpus for target " << target.name);
        for (const std::string& name : names) {
            CAPTURE(target.name);
            CAPTURE(name);
            const std::string bytes = read_file(root + "/" + target.name + "/" + name);
            CHECK_NOTHROW(target.run(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
            ++inputs;
        }
    }
    MESSAGE("replayed " << inputs << " inputs");
}

TEST_CASE("fuzz corpus: the sweep configs that once broke tools/sweep.py are refused with a ConfigError") {
    if (std::system("python3 --version > /dev/null 2>&1") != 0) {
        MESSAGE("skipped: no python3");
        return;
    }
    std::string output;
    const int rc = run_command("python3 tools/fuzz_sweep_config.py --replay tests/fuzz/corpus/sweep_config", output);
    INFO(output);
    CHECK(rc == 0);
    CHECK(output.find("0 failed") != std::string::npos);
}
