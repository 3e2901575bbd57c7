#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cstdlib>

#include "kernels/gpu.hpp"

namespace {
// QOPT_EIGEN_STREAMS=k runs the tests with batched eigendecompositions split over k worker
// streams (set_eigen_streams), to test a setting other than the built-in default end to end.
const bool eigen_streams_from_environment = [] {
    if (const char* streams = std::getenv("QOPT_EIGEN_STREAMS")) qopt::set_eigen_streams(std::atoi(streams));
    return true;
}();
}  // namespace
