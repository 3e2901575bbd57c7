// train: trains a model (olmo2 or gpt2 layout) on llm.c-format token shards.
#include <iostream>
#include <thread>

#include "core/error.hpp"
#include "train/launch.hpp"
#include "train/train_cli.hpp"

int main(int argc, char** argv) {
    // First of all: a SIGTERM during start-up then stops the run after its first step (with a
    // checkpoint) instead of killing it.
    qopt::install_stop_handlers();
    CLI::App app{"qopt train: train an OLMo2-style or GPT-2 model on token shards, with checkpoints and exact resume"};
    qopt::TrainOptions options;
    qopt::add_train_flags(app, options);
    qopt::LaunchOptions launch;
    app.add_option("--nproc", launch.nproc,
                   "Data-parallel ranks as processes of this machine (this one is rank 0), on the CPU or one GPU each "
                   "(see --collectives)")
        ->group("Data parallelism");
    app.add_option("--rendezvous", launch.rendezvous,
                   "host:port where rank 0 listens, for ranks started by mpirun or srun (their rank and count come "
                   "from the launcher's environment)")
        ->group("Data parallelism");
    bool list_presets = false;
    app.add_flag("--list-presets", list_presets, "Print the model presets with exact parameter counts and exit");
    const bool child = std::getenv("QOPT_RANK") != nullptr;
    const std::string program = child ? "train (rank " + std::string(std::getenv("QOPT_RANK")) + ")" : "train";
    return qopt::run_main(app, argc, argv, program.c_str(), [&] {
        if (list_presets) {
            std::cout << qopt::presets_table();
            return 0;
        }
        QOPT_CHECK(launch.nproc == 1 || options.cpu_ranks == 1, "--nproc and --cpu-ranks are two ways to run ranks; "
                   "give one");
        qopt::RankGroup ranks(launch, argv);
        // Ranks on one machine share its cores unless told otherwise.
        if (ranks.place().world_size > 1 && options.threads == 0 && (launch.nproc > 1 || ranks.place().started_by_nproc))
            options.threads = std::max(1, int(std::thread::hardware_concurrency()) / ranks.place().world_size);
        options.local_rank = ranks.place().local_rank;
        qopt::TrainResult result = qopt::run_training(options, std::cout, ranks.communicator());
        ranks.finish();
        if (result.interrupted && ranks.place().rank == 0)
            std::cout << "interrupted; resume with --resume auto --out-dir " << options.out_dir << "\n";
        return 0;
    });
}
