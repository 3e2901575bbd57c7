// Starting the ranks of a data-parallel run in separate processes and joining them into one
// group (train/tcp_communicator.hpp). Three ways, as issue 7 asks:
//   train --nproc N ...                 this process is rank 0 and starts ranks 1..N-1 on this
//                                       machine (the same command, its place in the environment);
//   mpirun -np N train --rendezvous H:P ...  /  srun train --rendezvous H:P ...
//                                       each process reads its rank and the rank count from the
//                                       launcher's environment (OMPI_COMM_WORLD_RANK / _SIZE,
//                                       PMI_RANK / PMI_SIZE, SLURM_PROCID / SLURM_NTASKS) and
//                                       meets the others at H:P, where rank 0 listens;
//   QOPT_RANK, QOPT_WORLD_SIZE, QOPT_RENDEZVOUS (and QOPT_LOCAL_RANK) in the environment (what
//                                       --nproc sets for its children; any other launcher can set them too).
#pragma once
#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "train/communicator.hpp"

namespace qopt {

struct LaunchOptions {
    int nproc = 1;           // --nproc
    std::string rendezvous;  // --rendezvous host:port
    double timeout_seconds = 120;
};

// This process's place: from QOPT_* (set by --nproc for its children), else from an MPI or Slurm
// launcher's variables when --rendezvous is given. world_size 1: a single process.
struct RankPlace {
    int rank = 0, world_size = 1;
    // Its place among the ranks of its machine (which GPU it takes): QOPT_LOCAL_RANK, or the MPI /
    // Slurm launcher's local rank; -1 when unknown (then the rank is used).
    int local_rank = -1;
    std::string rendezvous;
    bool started_by_nproc = false;  // a child of train --nproc
};
RankPlace rank_place(const LaunchOptions& options);

// The ranks of a run, for the length of the run: joins (or, for --nproc, starts and joins) the
// group; its destructor waits for the children it started (stopping them when this rank failed).
class RankGroup {
public:
    // argv: this process's command line, re-run by the children of --nproc.
    RankGroup(const LaunchOptions& options, char** argv);
    ~RankGroup();
    Communicator* communicator() { return comm_.get(); }  // null for a single process
    const RankPlace& place() const { return place_; }
    // After a successful run: waits for the children; throws naming the first that failed.
    void finish();

private:
    RankPlace place_;
    std::vector<pid_t> children_;
    std::unique_ptr<Communicator> comm_;
};

}  // namespace qopt
