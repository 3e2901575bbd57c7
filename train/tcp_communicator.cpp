#include "train/tcp_communicator.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "core/error.hpp"

namespace qopt {

namespace {

const uint32_t kGreeting = 0x31545051;  // "QPT1": the first bytes a rank sends to rank 0

struct Address {
    std::string host;
    int port;
};

Address parse_address(const std::string& address) {
    const size_t colon = address.rfind(':');
    QOPT_CHECK(colon != std::string::npos && colon > 0 && colon + 1 < address.size(), "--rendezvous '", address,
               "': expected host:port");
    int port = 0;
    try {
        size_t used = 0;
        port = std::stoi(address.substr(colon + 1), &used);
        QOPT_CHECK(used == address.size() - colon - 1, "");
    } catch (...) {
        fail("--rendezvous '", address, "': the port is not a number");
    }
    QOPT_CHECK(port > 0 && port < 65536, "--rendezvous '", address, "': port ", port, " is outside 1..65535");
    return {address.substr(0, colon), port};
}

sockaddr_in resolve(const Address& a) {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    const int rc = getaddrinfo(a.host.c_str(), nullptr, &hints, &found);
    if (rc != 0 || !found) fail("rendezvous: cannot resolve host '", a.host, "': ", gai_strerror(rc));
    sockaddr_in out = *reinterpret_cast<sockaddr_in*>(found->ai_addr);
    freeaddrinfo(found);
    out.sin_port = htons(uint16_t(a.port));
    return out;
}

// A connected socket that sends and receives whole messages, closed with the object.
class Link {
public:
    explicit Link(int fd = -1, int peer = -1) : fd_(fd), peer_(peer) {
        if (fd_ >= 0) {
            const int one = 1;
            setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
    }
    Link(Link&& other) noexcept : fd_(other.fd_), peer_(other.peer_) { other.fd_ = -1; }
    Link& operator=(Link&& other) noexcept {
        std::swap(fd_, other.fd_);
        std::swap(peer_, other.peer_);
        return *this;
    }
    ~Link() {
        if (fd_ >= 0) close(fd_);
    }
    void set_peer(int peer) { peer_ = peer; }

    void send(const void* data, size_t bytes) const {
        const char* p = static_cast<const char*>(data);
        while (bytes > 0) {
            const ssize_t n = ::send(fd_, p, bytes, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) fail("data-parallel rank ", peer_, " is gone (send: ", std::strerror(errno), ")");
            p += n;
            bytes -= size_t(n);
        }
    }
    void receive(void* data, size_t bytes) const {
        char* p = static_cast<char*>(data);
        while (bytes > 0) {
            const ssize_t n = ::recv(fd_, p, bytes, 0);
            if (n < 0 && errno == EINTR) continue;
            if (n == 0) fail("data-parallel rank ", peer_, " disconnected (it stopped or failed)");
            if (n < 0) fail("data-parallel rank ", peer_, " is gone (receive: ", std::strerror(errno), ")");
            p += n;
            bytes -= size_t(n);
        }
    }
    // A length-prefixed message.
    void send_message(const std::string& bytes) const {
        const uint64_t size = bytes.size();
        send(&size, sizeof size);
        send(bytes.data(), bytes.size());
    }
    std::string receive_message() const {
        uint64_t size = 0;
        receive(&size, sizeof size);
        std::string bytes(size, '\0');
        receive(bytes.data(), size);
        return bytes;
    }

private:
    int fd_;
    int peer_;
};

// Rank 0 holds a link to every other rank; the others one link to rank 0.
class TcpGroup final : public Communicator {
public:
    TcpGroup(int rank, int world_size, std::vector<Link> links, std::string address)
        : rank_(rank), world_size_(world_size), links_(std::move(links)), address_(std::move(address)) {}
    std::string describe() const override { return "processes over TCP, rank 0 at " + address_; }
    int rank() const override { return rank_; }
    int world_size() const override { return world_size_; }

    void all_reduce_mean(float* values, size_t count) override {
        if (rank_ != 0) {
            to_root().send(values, count * sizeof(float));
            to_root().receive(values, count * sizeof(float));
            return;
        }
        // Sum in rank order (in double), then divide: LocalGroup's arithmetic, bit for bit.
        std::vector<double> sum(values, values + count);
        std::vector<float> theirs(count);
        for (int r = 1; r < world_size_; ++r) {
            links_[size_t(r)].receive(theirs.data(), count * sizeof(float));
            for (size_t i = 0; i < count; ++i) sum[i] += double(theirs[i]);
        }
        for (size_t i = 0; i < count; ++i) values[i] = float(sum[i] / world_size_);
        for (int r = 1; r < world_size_; ++r) links_[size_t(r)].send(values, count * sizeof(float));
    }

    void all_reduce_sum(double* values, size_t count) override {
        if (rank_ != 0) {
            to_root().send(values, count * sizeof(double));
            to_root().receive(values, count * sizeof(double));
            return;
        }
        std::vector<double> theirs(count);
        for (int r = 1; r < world_size_; ++r) {
            links_[size_t(r)].receive(theirs.data(), count * sizeof(double));
            for (size_t i = 0; i < count; ++i) values[i] += theirs[i];
        }
        for (int r = 1; r < world_size_; ++r) links_[size_t(r)].send(values, count * sizeof(double));
    }

    void share_ranges(float* values, const std::vector<std::vector<ParamRange>>& ranges_by_rank) override {
        check_ranges_by_rank(ranges_by_rank);
        auto each_range = [&](int r, auto&& fn) {
            for (const ParamRange& range : ranges_by_rank[size_t(r)]) fn(values + range.offset, range.count * sizeof(float));
        };
        if (rank_ != 0) {
            each_range(rank_, [&](float* p, size_t bytes) { to_root().send(p, bytes); });
            // Then every other rank's share back from rank 0.
            for (int r = 0; r < world_size_; ++r)
                if (r != rank_) each_range(r, [&](float* p, size_t bytes) { to_root().receive(p, bytes); });
            return;
        }
        for (int r = 1; r < world_size_; ++r)
            each_range(r, [&](float* p, size_t bytes) { links_[size_t(r)].receive(p, bytes); });
        for (int to = 1; to < world_size_; ++to)
            for (int r = 0; r < world_size_; ++r)
                if (r != to) each_range(r, [&](float* p, size_t bytes) { links_[size_t(to)].send(p, bytes); });
    }

    std::vector<std::string> gather_to_root(const std::string& bytes) override {
        if (rank_ != 0) {
            to_root().send_message(bytes);
            return {};
        }
        std::vector<std::string> all = {bytes};
        for (int r = 1; r < world_size_; ++r) all.push_back(links_[size_t(r)].receive_message());
        return all;
    }

    void barrier() override {
        char token = 1;
        if (rank_ != 0) {
            to_root().send(&token, 1);
            to_root().receive(&token, 1);
            return;
        }
        for (int r = 1; r < world_size_; ++r) links_[size_t(r)].receive(&token, 1);
        for (int r = 1; r < world_size_; ++r) links_[size_t(r)].send(&token, 1);
    }

private:
    const Link& to_root() const { return links_[0]; }

    int rank_, world_size_;
    std::vector<Link> links_;  // rank 0: links_[r] to rank r (links_[0] unused); others: links_[0] to rank 0
    std::string address_;
};

int socket_or_fail(const char* what) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) fail("rendezvous: ", what, ": socket: ", std::strerror(errno));
    return fd;
}

}  // namespace

std::unique_ptr<Communicator> join_tcp_group(const std::string& address, int rank, int world_size,
                                             double timeout_seconds) {
    QOPT_CHECK(world_size >= 1, "a group needs at least 1 rank, got ", world_size);
    QOPT_CHECK(rank >= 0 && rank < world_size, "rank ", rank, " is outside 0..", world_size - 1);
    const Address where = parse_address(address);
    const sockaddr_in target = resolve(where);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_seconds);
    std::vector<Link> links(size_t(rank == 0 ? world_size : 1));
    if (rank == 0) {
        const int listen_fd = socket_or_fail("rank 0");
        Link listening(listen_fd);
        const int one = 1;
        setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        // A loopback address (--nproc) is listened at as given; any other on every interface,
        // since a host name can resolve to a loopback address on its own machine (Debian's
        // 127.0.1.1) while the other ranks reach it from outside.
        sockaddr_in listen_at = target;
        if ((ntohl(target.sin_addr.s_addr) >> 24) != 127) listen_at.sin_addr.s_addr = htonl(INADDR_ANY);
        if (bind(listen_fd, reinterpret_cast<const sockaddr*>(&listen_at), sizeof listen_at) != 0)
            fail("rendezvous: rank 0 cannot listen at ", address, ": ", std::strerror(errno));
        if (listen(listen_fd, world_size) != 0) fail("rendezvous: listen at ", address, ": ", std::strerror(errno));
        std::vector<bool> joined_ranks(size_t(world_size), false);
        int joined = 0;
        auto too_late = [&] {
            fail("rendezvous at ", address, ": only ", joined, " of ", world_size - 1, " ranks joined in ",
                 timeout_seconds, " s");
        };
        while (joined < world_size - 1) {
            // Wait for the next rank, at most until the deadline.
            const double left = std::chrono::duration<double>(deadline - std::chrono::steady_clock::now()).count();
            if (left <= 0) too_late();
            timeval wait{};
            wait.tv_sec = long(left);
            wait.tv_usec = long((left - double(wait.tv_sec)) * 1e6);
            setsockopt(listen_fd, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof wait);
            const int fd = accept(listen_fd, nullptr, nullptr);
            if (fd < 0) {
                if (errno == EINTR) continue;
                too_late();
            }
            // A connection that does not open with qopt's greeting within a few seconds (a port
            // scanner, a stray client) is dropped, and rank 0 keeps waiting for its ranks.
            Link link(fd);
            timeval greeting_wait{5, 0};
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &greeting_wait, sizeof greeting_wait);
            uint32_t magic = 0;
            try {
                link.receive(&magic, sizeof magic);
            } catch (const Error&) {
                continue;
            }
            if (magic != kGreeting) continue;
            int32_t peer = -1, peer_world = -1;
            link.receive(&peer, sizeof peer);
            link.receive(&peer_world, sizeof peer_world);
            timeval no_wait{0, 0};  // from here on, a rank may compute for as long as it needs
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &no_wait, sizeof no_wait);
            QOPT_CHECK(peer_world == world_size, "rendezvous at ", address, ": a rank of a ", peer_world,
                       "-rank group joined this ", world_size, "-rank group");
            QOPT_CHECK(peer > 0 && peer < world_size && !joined_ranks[size_t(peer)], "rendezvous at ", address,
                       ": rank ", peer, " joined twice or is outside 1..", world_size - 1);
            joined_ranks[size_t(peer)] = true;
            link.set_peer(peer);
            links[size_t(peer)] = std::move(link);
            ++joined;
        }
    } else {
        while (true) {
            const int fd = socket_or_fail("connect");
            if (connect(fd, reinterpret_cast<const sockaddr*>(&target), sizeof target) == 0) {
                links[0] = Link(fd, 0);
                break;
            }
            close(fd);
            if (std::chrono::steady_clock::now() > deadline)
                fail("rendezvous: rank ", rank, " could not reach rank 0 at ", address, " in ", timeout_seconds, " s");
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        const int32_t me = rank, world = world_size;
        links[0].send(&kGreeting, sizeof kGreeting);
        links[0].send(&me, sizeof me);
        links[0].send(&world, sizeof world);
    }
    auto group = std::make_unique<TcpGroup>(rank, world_size, std::move(links), address);
    group->barrier();  // everyone is in
    return group;
}

int free_local_port() {
    const int fd = socket_or_fail("port probe");
    Link owner(fd);
    sockaddr_in any{};
    any.sin_family = AF_INET;
    any.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    any.sin_port = 0;
    socklen_t size = sizeof any;
    if (bind(fd, reinterpret_cast<sockaddr*>(&any), sizeof any) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&any), &size) != 0)
        fail("cannot find a free local port: ", std::strerror(errno));
    return ntohs(any.sin_port);
}

}  // namespace qopt
