// Multi-GPU data parallelism: NCCL collectives between the ranks' GPUs, one process per GPU.
// The communicator wraps the host group that started the ranks (train/tcp_communicator.hpp):
// that group hands out NCCL's unique id and keeps the small host-side operations (losses, flags,
// checkpoint shares, barriers); gradients and ZeRO-1 parameter shares go GPU to GPU through NCCL
// (DeviceCollectives). NCCL is loaded at run time (libnccl.so.2, found as the dynamic loader
// finds libraries: LD_LIBRARY_PATH, the ldconfig cache), so the binaries build and run without it
// and only a multi-GPU run needs it. NVLink multicast stays off (NCCL_NVLS_ENABLE=0 unless set).
#pragma once
#include <memory>
#include <string>

#include "train/communicator.hpp"

namespace qopt {

// Why NCCL cannot be used by this process ("" when it can): the library is missing or older than
// 2.10 (the first with an averaging all-reduce).
std::string nccl_unavailable_reason();

// A communicator over `host` (which must outlive it) whose device collectives run through NCCL
// among host's ranks; each rank must have selected its own GPU (use_cuda_device) first, and every
// rank calls this together. Throws qopt::Error naming NCCL's complaint (e.g. two ranks on one GPU).
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& host);

}  // namespace qopt
