#include "train/launch.hpp"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "core/error.hpp"
#include "train/tcp_communicator.hpp"

namespace qopt {

namespace {

// The integer in environment variable `name`, or -1 when it is not set.
int env_int(const char* name) {
    const char* text = std::getenv(name);
    if (!text || !*text) return -1;
    char* end = nullptr;
    const long value = std::strtol(text, &end, 10);
    QOPT_CHECK(*end == '\0' && value >= 0 && value < (1 << 20), "environment variable ", name, "='", text,
               "' is not a rank number");
    return int(value);
}

// Waits for child `pid`; its wait status.
int reap(pid_t pid) {
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return status;
}

// SIGTERM to each child, then waits for them all.
void stop_children(std::vector<pid_t>& children) {
    for (pid_t pid : children) kill(pid, SIGTERM);
    for (pid_t pid : children) reap(pid);
    children.clear();
}

}  // namespace

RankPlace rank_place(const LaunchOptions& options) {
    QOPT_CHECK(options.nproc >= 1, "--nproc must be at least 1, got ", options.nproc);
    RankPlace place;
    // A child of --nproc, or any launcher that sets qopt's own variables.
    if (env_int("QOPT_RANK") >= 0) {
        place.rank = env_int("QOPT_RANK");
        place.world_size = env_int("QOPT_WORLD_SIZE");
        const char* rendezvous = std::getenv("QOPT_RENDEZVOUS");
        QOPT_CHECK(place.world_size > place.rank && rendezvous && *rendezvous,
                   "QOPT_RANK is set, but QOPT_WORLD_SIZE (above it) or QOPT_RENDEZVOUS is not");
        place.rendezvous = rendezvous;
        place.local_rank = env_int("QOPT_LOCAL_RANK");
        place.started_by_nproc = true;
        return place;
    }
    if (options.nproc > 1) {
        place.world_size = options.nproc;  // this process is rank 0; the address is chosen when starting
        place.rendezvous = options.rendezvous;
        place.local_rank = 0;
        return place;
    }
    if (options.rendezvous.empty()) return place;
    // mpirun (Open MPI, or MPICH's PMI), or srun.
    const std::pair<const char*, const char*> launchers[] = {
        {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"}, {"PMI_RANK", "PMI_SIZE"}, {"SLURM_PROCID", "SLURM_NTASKS"}};
    for (const auto& [rank_var, size_var] : launchers) {
        if (env_int(rank_var) < 0) continue;
        place.rank = env_int(rank_var);
        place.world_size = env_int(size_var);
        QOPT_CHECK(place.world_size > place.rank, rank_var, " is set but ", size_var, " is not above it");
        place.rendezvous = options.rendezvous;
        // The rank's place on its machine (which GPU it takes): Open MPI's, MPICH's or Slurm's.
        for (const char* local_var : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
            if (env_int(local_var) >= 0) {
                place.local_rank = env_int(local_var);
                break;
            }
        return place;
    }
    fail("--rendezvous ", options.rendezvous, " needs the ranks' places: run under mpirun or srun, or set QOPT_RANK "
         "and QOPT_WORLD_SIZE (or use --nproc on one machine)");
}

RankGroup::RankGroup(const LaunchOptions& options, char** argv) : place_(rank_place(options)) {
    if (place_.world_size == 1) return;
    if (options.nproc > 1 && !place_.started_by_nproc) {
        if (place_.rendezvous.empty()) place_.rendezvous = "127.0.0.1:" + std::to_string(free_local_port());
        const pid_t parent = getpid();
        for (int r = 1; r < place_.world_size; ++r) {
            const pid_t pid = fork();
            if (pid < 0) fail("--nproc: cannot start rank ", r, ": ", std::strerror(errno));
            if (pid == 0) {  // the child: the same command, its place in the environment
                // A rank of --nproc lives only as long as rank 0, its parent: killed with it (it
                // would otherwise wait out the rendezvous timeout, or its next exchange).
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                if (getppid() != parent) _exit(1);  // rank 0 died before the line above
                setenv("QOPT_RANK", std::to_string(r).c_str(), 1);
                setenv("QOPT_WORLD_SIZE", std::to_string(place_.world_size).c_str(), 1);
                setenv("QOPT_RENDEZVOUS", place_.rendezvous.c_str(), 1);
                setenv("QOPT_LOCAL_RANK", std::to_string(r).c_str(), 1);
                execv("/proc/self/exe", argv);
                std::fprintf(stderr, "--nproc: cannot start rank %d: %s\n", r, std::strerror(errno));
                _exit(127);
            }
            children_.push_back(pid);
        }
    }
    try {
        comm_ = join_tcp_group(place_.rendezvous, place_.rank, place_.world_size, options.timeout_seconds);
    } catch (...) {
        stop_children(children_);
        throw;
    }
}

void RankGroup::finish() {
    comm_.reset();  // closes the links
    std::string failed;
    for (size_t i = 0; i < children_.size(); ++i) {
        const int status = reap(children_[i]);
        if (failed.empty() && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
            failed = "rank " + std::to_string(i + 1) + (WIFEXITED(status) ? " exited with status " + std::to_string(WEXITSTATUS(status))
                                                                           : " was killed by signal " + std::to_string(WTERMSIG(status)));
    }
    children_.clear();
    if (!failed.empty()) fail("--nproc: ", failed);
}

RankGroup::~RankGroup() {
    // Reached with children still listed only when this rank failed: stop them and reap them.
    comm_.reset();
    stop_children(children_);
}

}  // namespace qopt
