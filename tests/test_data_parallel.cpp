// Data-parallel training on the CPU: ranks as threads of one process (train/communicator's
// LocalGroup), each with its rows of the batch and its ZeRO-1 share of the optimizer. The run
// must follow the single-process run (up to the order of the gradient sums), and its
// checkpoints must resume at any rank count.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <optional>
#include <sstream>
#include <thread>

#include "core/error.hpp"
#include "train_helpers.hpp"
#include "train/communicator.hpp"
#include "train/launch.hpp"
#include "train/tcp_communicator.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

// Runs `options` on `world` thread ranks (train --cpu-ranks); rank 0's result.
TrainResult run_ranks(TrainOptions options, int world, std::ostream& log) {
    options.cpu_ranks = world;
    return run_training(options, log);
}

double relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        norm += double(b[i]) * b[i];
    }
    return std::sqrt(diff / norm);
}

std::map<std::string, std::vector<int64_t>> state_shapes(const OptimizerState& state) {
    std::map<std::string, std::vector<int64_t>> shapes;
    for (const StateTensor& t : state.tensors) shapes[t.name] = t.shape;
    return shapes;
}

// What each rank of a 3-rank group gets from every operation.
struct Outcome {
    std::vector<float> mean, shared;
    double sum = 0;
    std::vector<std::string> gathered;
};

// Each rank r contributes r-dependent numbers to every operation of `comm`.
Outcome exercise(Communicator& comm) {
    const int r = comm.rank();
    Outcome out;
    out.mean = {float(r + 1), float(10 * r), 0.1f * float(r)};
    comm.all_reduce_mean(out.mean.data(), out.mean.size());
    out.sum = r + 0.5;
    comm.all_reduce_sum(&out.sum, 1);
    // Rank r owns values [2r, 2r + 2) of 6 and sets them to its number.
    out.shared.assign(6, -1.0f);
    out.shared[size_t(2 * r)] = out.shared[size_t(2 * r + 1)] = float(r);
    const std::vector<std::vector<ParamRange>> ranges = {{{0, 2}}, {{2, 2}}, {{4, 2}}};
    comm.share_ranges(out.shared.data(), ranges);
    out.gathered = comm.gather_to_root("rank " + std::to_string(r));
    comm.barrier();
    return out;
}

void check_outcomes(const std::vector<Outcome>& outcomes) {
    for (const Outcome& o : outcomes) {
        CHECK(o.mean == std::vector<float>{2.0f, 10.0f, float((0.0 + 0.1f + 0.2f) / 3)});
        CHECK(o.sum == 0.5 + 1.5 + 2.5);
        CHECK(o.shared == std::vector<float>{0, 0, 1, 1, 2, 2});
    }
    CHECK(outcomes[0].gathered == std::vector<std::string>{"rank 0", "rank 1", "rank 2"});
    CHECK(outcomes[1].gathered.empty());
}

}  // namespace

TEST_CASE("LocalGroup: mean, sum, shared ranges and gathers are the same on every rank; a failed rank stops the rest") {
    const int world = 3;
    LocalGroup group(world);
    std::vector<Outcome> outcomes(world);
    std::vector<std::thread> threads;
    for (int r = 0; r < world; ++r) threads.emplace_back([&, r] { outcomes[size_t(r)] = exercise(group.rank(r)); });
    for (auto& t : threads) t.join();
    check_outcomes(outcomes);

    // Rank 1 fails before the barrier; rank 0 and 2, waiting in it, are released with an error.
    LocalGroup failing(world);
    std::vector<std::string> outcome(world);
    threads.clear();
    for (int r = 0; r < world; ++r)
        threads.emplace_back([&, r] {
            try {
                if (r == 1) throw Error("rank 1's shard is missing");
                failing.rank(r).barrier();
                outcome[size_t(r)] = "passed";
            } catch (const std::exception& e) {
                outcome[size_t(r)] = e.what();
                failing.abort(e.what());
            }
        });
    for (auto& t : threads) t.join();
    CHECK(outcome[0] == "another rank stopped: rank 1's shard is missing");
    CHECK(outcome[2] == "another rank stopped: rank 1's shard is missing");
    CHECK_THROWS_WITH_AS(LocalGroup(0), doctest::Contains("at least 1 rank"), Error);
}

// A group's rank whose after-step sums (the two values: rejected preconditioners, stop flag)
// call request_stop() right after the `at`-th of them: a SIGTERM that lands while the ranks
// exchange, after this rank has read its flag.
class StopDuringExchange : public Communicator {
public:
    StopDuringExchange(Communicator& inner, int at) : inner_(inner), countdown_(at) {}
    int rank() const override { return inner_.rank(); }
    int world_size() const override { return inner_.world_size(); }
    void all_reduce_mean(float* values, size_t count) override { inner_.all_reduce_mean(values, count); }
    void all_reduce_sum(double* values, size_t count) override {
        inner_.all_reduce_sum(values, count);
        if (count == 2 && --countdown_ == 0) request_stop();
    }
    void share_ranges(float* values, const std::vector<std::vector<ParamRange>>& ranges_by_rank) override {
        inner_.share_ranges(values, ranges_by_rank);
    }
    std::vector<std::string> gather_to_root(const std::string& bytes) override { return inner_.gather_to_root(bytes); }
    void barrier() override { inner_.barrier(); }
    std::string describe() const override { return "a stop request during an exchange"; }

private:
    Communicator& inner_;
    int countdown_;
};

TEST_CASE("a stop request (SIGTERM) that lands while the ranks exchange stops the run one step later, not never") {
    TempDir dir;
    std::ostringstream log;
    TrainOptions o = tiny_run(dir, 20);
    o.device = "cpu";
    LocalGroup group(1);
    StopDuringExchange comm(group.rank(0), 5);
    const TrainResult r = run_training(o, log, &comm);
    INFO(log.str());
    CHECK(r.interrupted);
    CHECK(r.final_step == 6);  // the request came after step 5's flag was read: step 6 sees it
    CHECK(log.str().find("stop requested: saving a checkpoint at step 6") != std::string::npos);
    // Consumed: the next run in this process trains to its end.
    TrainOptions again = tiny_run(dir, 3);
    again.device = "cpu";
    again.out_dir = dir / "again";
    std::ostringstream again_log;
    CHECK_FALSE(run_training(again, again_log).interrupted);
}

TEST_CASE("data-parallel CPU training on 2 and 3 ranks follows the single-process run; checkpoints resume at any rank count") {
    TempDir dir;
    std::ostringstream log;
    for (const std::string name : {"adamw", "muon", "scion", "shampoo", "soap", "psgd"}) {
        CAPTURE(name);
        TrainOptions o = tiny_run(dir, 8);
        // Square 64 x 64 matrices only (GPT-2 layout, d_ff 64): Shampoo's and SOAP's factors are
        // full rank from the first step. (With a 256-wide MLP the wide side's factor is rank-
        // deficient for the first steps, and its null-space basis - SOAP's, and Shampoo's roots
        // at eps 1e-12 - is set by rounding: any two runs whose gradients differ in the last bit,
        // as the ranks' sums do, part there by percents, as the README notes for CPU and GPU.)
        o.preset = "gpt2-tiny";
        o.d_ff = 64;
        o.device = "cpu";
        o.optimizer = name;
        o.optim.lr = name == "adamw" ? 1e-2 : 0;
        o.optim.shampoo.precondition_frequency = 3;
        o.optim.soap.precondition_frequency = 3;
        o.batch_size = 6;  // 6 rows: 3 each on 2 ranks, 2 each on 3
        o.checkpoint_every = 4;
        o.keep_checkpoints = 0;
        o.out_dir = dir / ("single_" + name);
        const TrainResult single = run_training(o, log);
        const Checkpoint single_end = read_checkpoint(single.last_checkpoint);
        const Checkpoint single_mid = read_checkpoint(o.out_dir + "/checkpoints/" + checkpoint_name(4));

        // SOAP runs Adam in its factors' eigenbases, and eigenvectors of nearly equal eigenvalues
        // turn with the last bits of the factors; Adam is not rotation-invariant, so its weights
        // part from the single process's by ~2% here (losses by ~1e-4) while every other method
        // stays within 1e-4. The sharded step itself is exact for SOAP too (test_shard_plan.cpp).
        const double loss_tolerance = name == "soap" ? 1e-3 : 1e-4, weight_tolerance = name == "soap" ? 5e-2 : 1e-4;
        for (int world : {2, 3}) {
            CAPTURE(world);
            TrainOptions ranks = o;
            ranks.out_dir = dir / ("ranks" + std::to_string(world) + "_" + name);
            const TrainResult parallel = run_ranks(ranks, world, log);
            REQUIRE(parallel.train_losses.size() == single.train_losses.size());
            for (size_t i = 0; i < single.train_losses.size(); ++i)
                CHECK(parallel.train_losses[i] == doctest::Approx(single.train_losses[i]).epsilon(loss_tolerance));
            CHECK(parallel.val_loss_end == doctest::Approx(single.val_loss_end).epsilon(loss_tolerance));
            const Checkpoint end = read_checkpoint(parallel.last_checkpoint);
            CHECK(relative_difference(end.params, single_end.params) < weight_tolerance);
            // Rank 0 wrote the whole optimizer state: the same tensors as one process's.
            CHECK(state_shapes(end.optimizer) == state_shapes(single_end.optimizer));
            CHECK(end.optimizer.extra.dump() == single_end.optimizer.extra.dump());
            const Checkpoint mid = read_checkpoint(ranks.out_dir + "/checkpoints/" + checkpoint_name(4));
            CHECK(state_shapes(mid.optimizer) == state_shapes(single_mid.optimizer));
        }
        // The 2-rank run's step-4 checkpoint resumed on one process, and the single process's on 3 ranks.
        TrainOptions from_two = o;
        from_two.out_dir = dir / ("resumed1_" + name);
        from_two.resume = dir / ("ranks2_" + name) + "/checkpoints/" + checkpoint_name(4);
        const TrainResult resumed_alone = run_training(from_two, log);
        CHECK(relative_difference(read_checkpoint(resumed_alone.last_checkpoint).params, single_end.params) <
              weight_tolerance);
        TrainOptions from_one = o;
        from_one.out_dir = dir / ("resumed3_" + name);
        from_one.resume = o.out_dir + "/checkpoints/" + checkpoint_name(4);
        const TrainResult resumed_ranks = run_ranks(from_one, 3, log);
        CHECK(relative_difference(read_checkpoint(resumed_ranks.last_checkpoint).params, single_end.params) <
              weight_tolerance);
    }
    // A batch that does not split over the ranks is refused before any step, by name.
    TrainOptions odd = tiny_run(dir, 2);
    odd.device = "cpu";
    odd.batch_size = 5;
    odd.out_dir = dir / "odd";
    CHECK_THROWS_WITH_AS(run_ranks(odd, 2, log), doctest::Contains("--train-data: the batch of 5 sequences does not "
                                                                   "split evenly over 2 ranks"),
                         Error);
    odd.batch_size = 4;
    odd.device = "cuda";
    CHECK_THROWS_WITH_AS(run_ranks(odd, 2, log), doctest::Contains("on GPUs start one process per rank"), Error);
    odd.device = "cpu";
    odd.collectives = "gloo";
    CHECK_THROWS_WITH_AS(run_ranks(odd, 2, log), doctest::Contains("--collectives must be auto, nccl or host"), Error);
}

TEST_CASE("TCP group: the same results as LocalGroup's threads; bad addresses, missing and vanished ranks are errors") {
    const int world = 3;
    const std::string address = "127.0.0.1:" + std::to_string(free_local_port());
    std::vector<Outcome> outcomes(world);
    std::vector<std::string> errors(world);
    std::vector<std::thread> threads;
    for (int r = 0; r < world; ++r)
        threads.emplace_back([&, r] {
            try {
                outcomes[size_t(r)] = exercise(*join_tcp_group(address, r, world, 20));
            } catch (const std::exception& e) {
                errors[size_t(r)] = e.what();
            }
        });
    for (auto& t : threads) t.join();
    for (const std::string& e : errors) CHECK(e.empty());
    check_outcomes(outcomes);

    // A stray connection that does not greet like a rank is dropped; the ranks still meet.
    const std::string guarded = "127.0.0.1:" + std::to_string(free_local_port());
    std::string guarded_error;
    std::thread root([&] {
        try {
            double x = 2;
            join_tcp_group(guarded, 0, 2, 20)->all_reduce_sum(&x, 1);
            CHECK(x == 5);
        } catch (const std::exception& e) {
            guarded_error = e.what();
        }
    });
    {
        // The stray: connects (retrying until rank 0 listens), sends junk, leaves.
        const sockaddr_in to = [&] {
            sockaddr_in a{};
            a.sin_family = AF_INET;
            a.sin_port = htons(uint16_t(std::stoi(guarded.substr(guarded.rfind(':') + 1))));
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return a;
        }();
        for (int attempt = 0; attempt < 200; ++attempt) {
            const int fd = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(fd, reinterpret_cast<const sockaddr*>(&to), sizeof to) == 0) {
                const char junk[] = "GET / HTTP/1.0\r\n\r\n";
                CHECK(send(fd, junk, sizeof junk, 0) > 0);
                close(fd);
                break;
            }
            close(fd);
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        double y = 3;
        join_tcp_group(guarded, 1, 2, 20)->all_reduce_sum(&y, 1);
        CHECK(y == 5);
    }
    root.join();
    CHECK(guarded_error.empty());

    CHECK_THROWS_WITH_AS(join_tcp_group("localhost", 0, 2), doctest::Contains("expected host:port"), Error);
    CHECK_THROWS_WITH_AS(join_tcp_group("localhost:99999", 0, 2), doctest::Contains("outside 1..65535"), Error);
    CHECK_THROWS_WITH_AS(join_tcp_group("no-such-host.invalid:4000", 1, 2, 1), doctest::Contains("cannot resolve"),
                         Error);
    // Rank 0 alone: nobody joins in time.
    const std::string lonely = "127.0.0.1:" + std::to_string(free_local_port());
    CHECK_THROWS_WITH_AS(join_tcp_group(lonely, 0, 2, 0.5), doctest::Contains("only 0 of 1 ranks joined"), Error);
    // Rank 1 without rank 0.
    CHECK_THROWS_WITH_AS(join_tcp_group(lonely, 1, 2, 0.5), doctest::Contains("could not reach rank 0"), Error);
    // A rank that goes away: the other's next operation fails by name instead of waiting.
    const std::string two = "127.0.0.1:" + std::to_string(free_local_port());
    std::string survivor_error;
    std::thread survivor([&] {
        try {
            auto comm = join_tcp_group(two, 0, 2, 20);
            comm->barrier();  // rank 1 leaves after the group is formed
            double x = 1;
            comm->all_reduce_sum(&x, 1);
        } catch (const std::exception& e) {
            survivor_error = e.what();
        }
    });
    { auto leaving = join_tcp_group(two, 1, 2, 20); leaving->barrier(); }
    survivor.join();
    CHECK(survivor_error.find("rank 1 disconnected") != std::string::npos);
}

TEST_CASE("train --nproc 2 (processes over TCP) gives --cpu-ranks 2's run bit for bit; bad launches are refused by name") {
    TempDir dir;
    TrainOptions o = tiny_run(dir, 6);  // writes the shards
    const std::string common = bin("train") + " --device cpu --preset olmo2-tiny --vocab-size 64 --max-seq-len 32 "
                               "--train-data " + o.train_data + " --val-data " + o.val_data +
                               " --batch-size 4 --seq-len 32 --steps 6 --lr 1e-2 --val-batches 2 --threads 1";
    std::string output;
    REQUIRE(run_command(common + " --cpu-ranks 2 --out-dir " + (dir / "threads"), output) == 0);
    REQUIRE_MESSAGE(run_command(common + " --nproc 2 --out-dir " + (dir / "processes"), output) == 0, output);
    CHECK(output.find("processes over TCP") != std::string::npos);
    const std::vector<double> by_threads = metrics_train_losses(dir / "threads/metrics.jsonl");
    CHECK(by_threads.size() == 6);
    CHECK(metrics_train_losses(dir / "processes/metrics.jsonl") == by_threads);
    CHECK(read_checkpoint(list_checkpoints(dir / "threads")[0]).params ==
          read_checkpoint(list_checkpoints(dir / "processes")[0]).params);

    CHECK(run_command(common + " --nproc 2 --cpu-ranks 2 --out-dir " + (dir / "both"), output) == 1);
    CHECK(output.find("--nproc and --cpu-ranks are two ways") != std::string::npos);
    CHECK(run_command(common + " --nproc 3 --out-dir " + (dir / "odd"), output) == 1);  // 4 rows over 3 ranks
    CHECK(output.find("does not split evenly over 3 ranks") != std::string::npos);
    CHECK(run_command(common + " --rendezvous 127.0.0.1:4000 --out-dir " + (dir / "alone"), output) == 1);
    CHECK(output.find("needs the ranks' places") != std::string::npos);
    if (!gpu_available()) {  // GPU ranks without a GPU: every rank says so, whatever the collectives
        for (const char* collectives : {"auto", "nccl", "host"}) {
            CHECK(run_command(common + " --device cuda --nproc 2 --collectives " + collectives + " --out-dir " +
                                  (dir / "no_gpu"),
                              output) == 1);
            CHECK(output.find("train: error: --device cuda: no CUDA GPU") != std::string::npos);
        }
    }
}

namespace {

// Sets environment variables for the length of a scope, restoring what was there before.
class ScopedEnvironment {
public:
    void set(const char* name, const char* value) {
        const char* old = std::getenv(name);
        saved_.push_back({name, old ? std::optional<std::string>(old) : std::nullopt});
        if (value) setenv(name, value, 1);
        else unsetenv(name);
    }
    ~ScopedEnvironment() {
        for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
            if (it->second) setenv(it->first.c_str(), it->second->c_str(), 1);
            else unsetenv(it->first.c_str());
        }
    }

private:
    std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

}  // namespace

TEST_CASE("launch: each rank's place on its machine (which GPU it takes) comes from --nproc's, Open MPI's, MPICH's "
          "or Slurm's variables") {
    const char* all_vars[] = {"QOPT_RANK", "QOPT_WORLD_SIZE", "QOPT_RENDEZVOUS", "QOPT_LOCAL_RANK",
                              "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK",
                              "PMI_SIZE", "MPI_LOCALRANKID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"};
    ScopedEnvironment clean;
    for (const char* name : all_vars) clean.set(name, nullptr);
    LaunchOptions options;
    CHECK(rank_place(options).local_rank == -1);  // a single process
    options.nproc = 4;
    CHECK(rank_place(options).local_rank == 0);  // rank 0 of --nproc
    options.nproc = 1;
    {
        ScopedEnvironment child;  // what --nproc sets for rank 2
        for (auto [name, value] : {std::pair{"QOPT_RANK", "2"}, {"QOPT_WORLD_SIZE", "4"},
                                   {"QOPT_RENDEZVOUS", "127.0.0.1:5000"}, {"QOPT_LOCAL_RANK", "2"}})
            child.set(name, value);
        const RankPlace place = rank_place(options);
        CHECK(place.rank == 2);
        CHECK(place.local_rank == 2);
        CHECK(place.started_by_nproc);
    }
    options.rendezvous = "node0:5000";
    {
        ScopedEnvironment mpi;  // Open MPI: rank 5 of 8, the second on its node
        for (auto [name, value] : {std::pair{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "8"},
                                   {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}})
            mpi.set(name, value);
        const RankPlace place = rank_place(options);
        CHECK(place.rank == 5);
        CHECK(place.world_size == 8);
        CHECK(place.local_rank == 1);
        mpi.set("OMPI_COMM_WORLD_LOCAL_RANK", "one");
        CHECK_THROWS_WITH_AS(rank_place(options), doctest::Contains("OMPI_COMM_WORLD_LOCAL_RANK='one' is not a rank"),
                             Error);
    }
    {
        ScopedEnvironment mpich;
        for (auto [name, value] : {std::pair{"PMI_RANK", "3"}, {"PMI_SIZE", "4"}, {"MPI_LOCALRANKID", "3"}})
            mpich.set(name, value);
        CHECK(rank_place(options).local_rank == 3);
    }
    {
        ScopedEnvironment slurm;
        for (auto [name, value] : {std::pair{"SLURM_PROCID", "6"}, {"SLURM_NTASKS", "8"}})
            slurm.set(name, value);
        CHECK(rank_place(options).local_rank == -1);  // unknown: the trainer takes the rank
        slurm.set("SLURM_LOCALID", "2");
        CHECK(rank_place(options).local_rank == 2);
    }
}
