// The quantization flags, shared by `train` (QAT: --qat w4a4 --qat-grid ...) and `ptq`
// (--format w4a4 --grid ...): the same words, each binary with its own prefix and defaults.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

#include "quant/linear_quant.hpp"

namespace qopt {

// prefix "qat": --qat FORMAT, --qat-grid, ...; prefix "": --format FORMAT, --grid, ...
// Call resolve_linear_quant(options, style) after parsing.
void add_quant_flags(CLI::App& app, QuantOptions& options, const std::string& prefix, QuantStyle style);

}  // namespace qopt
