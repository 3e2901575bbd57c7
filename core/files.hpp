// File helpers shared by every reader and writer: whole-file reads with clear errors,
// atomic writes (temp file, fsync, rename), glob patterns, and a content checksum.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace qopt {

std::string read_file(const std::string& path);  // throws qopt::Error naming the path
bool file_exists(const std::string& path);
bool is_directory(const std::string& path);
uint64_t file_size(const std::string& path);  // throws when missing

// Writes `bytes` to `path` so that readers see either the old file or the whole new one:
// write to path.tmp.<pid>, fsync, rename over path, fsync the directory.
void write_file_atomic(const std::string& path, const std::string& bytes);

// Creates a directory and its parents; throws when impossible. Then checks that a file can
// be created inside it (so an unwritable output directory fails before any work is done).
void make_directories(const std::string& path);
void check_writable_directory(const std::string& path);

// Expands a shell glob (e.g. "build/data/brown/brown_train_*.bin"); sorted; throws when the
// pattern is empty or matches nothing, naming it.
std::vector<std::string> expand_glob(const std::string& pattern, const char* what);

// The directory part of a file path ("runs/a.jsonl" -> "runs", "a.jsonl" -> ".").
std::string parent_directory(const std::string& path);

// Appends one line (a newline is added) to a results table such as a JSONL file, creating
// it; throws naming the path when it cannot be written.
void append_line(const std::string& path, const std::string& line);

// The current time as "2026-11-24T10:00:00Z".
std::string utc_timestamp();

// Lists the entries of a directory (names only, sorted); empty when it does not exist.
std::vector<std::string> list_directory(const std::string& path);

// Removes a file or a directory tree; quiet when missing.
void remove_all(const std::string& path);

// 64-bit FNV-1a over the bytes: cheap, good at catching truncation and bit flips.
uint64_t checksum64(const void* data, size_t size);
std::string hex64(uint64_t value);

}  // namespace qopt
