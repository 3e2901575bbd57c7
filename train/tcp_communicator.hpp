// Data-parallel ranks in separate processes, possibly on separate machines, over TCP: rank 0
// listens at the rendezvous address (host:port) and every other rank connects to it. A star:
// the ranks send to rank 0, which reduces in rank order and sends the result back. It carries the
// CPU path's multi-process runs (train --nproc N, or ranks started by mpirun / srun) with results
// bit for bit those of LocalGroup's threads, and is the rendezvous a multi-GPU run will use to
// hand out NCCL's unique id. Not fast: every rank's whole gradient passes through rank 0.
#pragma once
#include <memory>
#include <string>

#include "train/communicator.hpp"

namespace qopt {

// Joins the group of `world_size` ranks as `rank`. Rank 0 waits up to timeout_seconds for the
// others; the others retry their connection that long. Throws qopt::Error naming the address on
// failure; a rank that disconnects later makes the next operation throw on the others.
std::unique_ptr<Communicator> join_tcp_group(const std::string& address, int rank, int world_size,
                                             double timeout_seconds = 60);

// A free port on 127.0.0.1 (for a launcher that starts every rank on this machine).
int free_local_port();

}  // namespace qopt
