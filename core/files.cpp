#include "core/files.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <glob.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include "core/error.hpp"

namespace qopt {

std::string read_file(const std::string& path) {
    if (is_directory(path)) fail(path, ": is a directory, expected a file");
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(path, ": cannot open (", std::strerror(errno), ")");
    std::ostringstream buffer;
    buffer << in.rdbuf();
    if (in.bad()) fail(path, ": read error");
    return buffer.str();
}

bool file_exists(const std::string& path) {
    struct stat info;
    return ::stat(path.c_str(), &info) == 0;
}

bool is_directory(const std::string& path) {
    struct stat info;
    return ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

uint64_t file_size(const std::string& path) {
    struct stat info;
    if (::stat(path.c_str(), &info) != 0) fail(path, ": cannot stat (", std::strerror(errno), ")");
    return uint64_t(info.st_size);
}

std::string parent_directory(const std::string& path) {
    size_t slash = path.find_last_of('/');
    if (slash == std::string::npos) return ".";
    if (slash == 0) return "/";
    return path.substr(0, slash);
}

static void fsync_path(const std::string& path, bool directory) {
    int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
    if (fd < 0) return;
    ::fsync(fd);
    ::close(fd);
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
    std::string temp = path + ".tmp." + std::to_string(::getpid());
    int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) fail(path, ": cannot create (", std::strerror(errno), ")");
    size_t written = 0;
    while (written < bytes.size()) {
        ssize_t n = ::write(fd, bytes.data() + written, bytes.size() - written);
        if (n < 0) {
            if (errno == EINTR) continue;
            int saved = errno;
            ::close(fd);
            ::unlink(temp.c_str());
            fail(path, ": write failed (", std::strerror(saved), ")");
        }
        written += size_t(n);
    }
    if (::fsync(fd) != 0 || ::close(fd) != 0) {
        int saved = errno;
        ::unlink(temp.c_str());
        fail(path, ": flush failed (", std::strerror(saved), ")");
    }
    if (::rename(temp.c_str(), path.c_str()) != 0) {
        int saved = errno;
        ::unlink(temp.c_str());
        fail(path, ": rename failed (", std::strerror(saved), ")");
    }
    fsync_path(parent_directory(path), true);
}

void make_directories(const std::string& path) {
    if (path.empty()) fail("empty directory path");
    std::string partial;
    std::stringstream parts(path);
    std::string part;
    if (path[0] == '/') partial = "/";
    while (std::getline(parts, part, '/')) {
        if (part.empty()) continue;
        partial += part;
        if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
            fail(path, ": cannot create directory (", std::strerror(errno), ")");
        if (!is_directory(partial)) fail(path, ": ", partial, " exists and is not a directory");
        partial += "/";
    }
}

void check_writable_directory(const std::string& path) {
    make_directories(path);
    std::string probe = path + "/.write_probe." + std::to_string(::getpid());
    int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) fail(path, ": directory is not writable (", std::strerror(errno), ")");
    ::close(fd);
    ::unlink(probe.c_str());
}

std::vector<std::string> expand_glob(const std::string& pattern, const char* what) {
    if (pattern.empty()) fail(what, ": empty file pattern");
    glob_t matches;
    int rc = ::glob(pattern.c_str(), 0, nullptr, &matches);
    std::vector<std::string> paths;
    if (rc == 0)
        for (size_t i = 0; i < matches.gl_pathc; ++i) paths.emplace_back(matches.gl_pathv[i]);
    ::globfree(&matches);
    if (paths.empty()) fail(what, ": no file matches '", pattern, "'");
    std::sort(paths.begin(), paths.end());
    return paths;
}

std::vector<std::string> list_directory(const std::string& path) {
    std::vector<std::string> names;
    DIR* dir = ::opendir(path.c_str());
    if (!dir) return names;
    while (dirent* entry = ::readdir(dir)) {
        std::string name = entry->d_name;
        if (name != "." && name != "..") names.push_back(name);
    }
    ::closedir(dir);
    std::sort(names.begin(), names.end());
    return names;
}

void remove_all(const std::string& path) {
    if (is_directory(path)) {
        for (const auto& name : list_directory(path)) remove_all(path + "/" + name);
        ::rmdir(path.c_str());
    } else {
        ::unlink(path.c_str());
    }
}

uint64_t checksum64(const void* data, size_t size) {
    const unsigned char* bytes = static_cast<const unsigned char*>(data);
    uint64_t hash = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < size; ++i) {
        hash ^= bytes[i];
        hash *= 0x100000001B3ull;
    }
    return hash;
}

std::string hex64(uint64_t value) {
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(value));
    return buf;
}

void append_line(const std::string& path, const std::string& line) {
    std::ofstream out(path, std::ios::app);
    if (!out) fail(path, ": cannot open for appending");
    out << line << "\n";
    out.flush();
    if (!out) fail(path, ": write failed");
}

std::string utc_timestamp() {
    const std::time_t now = std::time(nullptr);
    char text[32];
    std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    return text;
}

}  // namespace qopt
