# qopt build. `make` builds every binary into build/bin; `make test` builds and runs the tests;
# `make run` prepares the default data (once) and trains the CPU demo model on it.
#
# Variables users set:  CUDA_HOME (default /usr/local/cuda), CUDA_ARCH (default sm_90a: Hopper with its
#                       wgmma attention kernels; sm_80, sm_89, sm_90 ... build the portable kernels only),
#                       CPU_ARCH (default native; passed to -march), OMP_NUM_THREADS at run time,
#                       BUILD (output folder, default build), EXTRA_NVCCFLAGS (kernel knobs, e.g.
#                       -DQOPT_KV_QUERY_TILE=32, to build variants side by side).

SHELL := /bin/bash
CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(CUDA_HOME)/bin/nvcc
CUDA_ARCH ?= sm_90a
CPU_ARCH ?= native
CXX ?= g++

BUILD ?= build
DEPS_INCLUDE := build/deps/include
DATA_DIR := build/data

WARNINGS := -Wall -Wextra -Wno-unknown-pragmas
CXXFLAGS ?= -O3 -march=$(CPU_ARCH) -g
CXXFLAGS += -std=c++17 -fopenmp $(WARNINGS) -I. -isystem $(DEPS_INCLUDE) -isystem $(CUDA_HOME)/include -MMD -MP
NVCCFLAGS ?= -O3
NVCCFLAGS += $(EXTRA_NVCCFLAGS) -std=c++17 -arch=$(CUDA_ARCH) -I. -isystem $(DEPS_INCLUDE) -MMD -MP
# sm_90a (arch-specific Hopper features) compiles the wgmma attention kernels in.
ifeq ($(CUDA_ARCH),sm_90a)
NVCCFLAGS += -DQOPT_WGMMA
endif
LDFLAGS += -fopenmp -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcusolver -lcublas -lcublasLt -lcudart_static -ldl -lrt -lpthread

# Library: every .cpp/.cu under the source folders except the binaries' main files.
SRC_DIRS := core data model kernels optim quant eval train
LIB_CPP := $(filter-out %_main.cpp,$(foreach d,$(SRC_DIRS),$(wildcard $(d)/*.cpp)))
LIB_CU := $(foreach d,$(SRC_DIRS),$(wildcard $(d)/*.cu))
LIB_OBJ := $(LIB_CPP:%.cpp=$(BUILD)/obj/%.o) $(LIB_CU:%.cu=$(BUILD)/obj/%.cu.o)
LIB := $(BUILD)/libqopt.a

BINARIES := train tokenize prepare_brown bench init_model optim_replay ptq eval analyze
BIN := $(BINARIES:%=$(BUILD)/bin/%)
TEST_SRC := $(wildcard tests/*.cpp) tests/fuzz/fuzz_targets.cpp
TEST_OBJ := $(TEST_SRC:%.cpp=$(BUILD)/obj/%.o)
TEST_BIN := $(BUILD)/bin/tests

.PHONY: all setup test run clean distclean deps fuzz fuzz-merge soak
all: deps $(BIN) $(TEST_BIN)

# Header-only dependencies are copied into build/deps/include by setup (tools/setup.sh), so
# the build needs nothing from the system's include path but CUDA; this folder travels to
# machines that cannot install packages.
deps: $(DEPS_INCLUDE)/CLI/CLI.hpp $(DEPS_INCLUDE)/doctest/doctest.h
$(DEPS_INCLUDE)/CLI/CLI.hpp $(DEPS_INCLUDE)/doctest/doctest.h:
	@bash tools/setup.sh deps

setup:
	@bash tools/setup.sh all

$(BUILD)/obj/%.o: %.cpp | deps
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(BUILD)/obj/%.cu.o: %.cu | deps
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	ar rcs $@ $^

$(BUILD)/bin/train: $(BUILD)/obj/train/train_main.o $(LIB)
$(BUILD)/bin/tokenize: $(BUILD)/obj/train/tokenize_main.o $(LIB)
$(BUILD)/bin/bench: $(BUILD)/obj/train/bench_main.o $(LIB)
$(BUILD)/bin/init_model: $(BUILD)/obj/tools/init_model_main.o $(LIB)
$(BUILD)/bin/prepare_brown: $(BUILD)/obj/tools/prepare_brown_main.o $(LIB)
$(BUILD)/bin/optim_replay: $(BUILD)/obj/tools/optim_replay_main.o $(LIB)
$(BUILD)/bin/ptq: $(BUILD)/obj/train/ptq_main.o $(LIB)
$(BUILD)/bin/eval: $(BUILD)/obj/train/eval_main.o $(LIB)
$(BUILD)/bin/analyze: $(BUILD)/obj/train/analyze_main.o $(LIB)
$(BUILD)/bin/%:
	@mkdir -p $(dir $@)
	$(CXX) $^ -o $@ $(LDFLAGS)

$(TEST_BIN): $(TEST_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CXX) $^ -o $@ $(LDFLAGS)

# The test binary finds the built tools and the default data through these variables.
test: all
	QOPT_BIN_DIR=$(BUILD)/bin QOPT_DATA_DIR=$(DATA_DIR) $(TEST_BIN) $(TEST_ARGS)

# The main job: a small OLMo2-style model on the Brown corpus, about 5.5 minutes on 2 CPU cores.
RUN_ARGS ?=
run: all
	@bash tools/setup.sh data
	$(BUILD)/bin/train --preset olmo2-mini --device auto \
	  --train-data '$(DATA_DIR)/brown/brown_train_*.bin' --val-data '$(DATA_DIR)/brown/brown_val_*.bin' \
	  --batch-size 8 --seq-len 128 --steps 450 --lr 4e-3 --warmup-steps 30 --schedule cosine \
	  --eval-every 150 --val-batches 30 --log-every 10 --out-dir runs/brown-olmo2-mini $(RUN_ARGS)

clean:
	rm -rf $(BUILD)/obj $(BUILD)/bin $(LIB)

distclean:
	rm -rf $(BUILD)

# Fuzzing (clang with libFuzzer, AddressSanitizer and UBSan; not part of `all`): one binary per
# target in tests/fuzz/fuzz_targets.hpp, each run FUZZ_SECONDS from the kept corpus
# (tests/fuzz/corpus/<target>, replayed by the tests) plus a working corpus in build/fuzz.
# A crash stops make and names the input (build/fuzz/crashes/); fix it and copy the input into
# the kept corpus. `make fuzz-merge` folds the working corpus's new coverage into the kept one.
FUZZ_CXX ?= clang++
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := shard safetensors checkpoint_state tokenizer rank_state json
FUZZ_SRC := $(wildcard core/*.cpp) data/shard.cpp data/tokenizer.cpp train/checkpoint.cpp model/config.cpp \
            model/params.cpp optim/optimizer_state.cpp tests/fuzz/fuzz_targets.cpp
FUZZ_FLAGS := -std=c++17 -O1 -g -I. -isystem $(CUDA_HOME)/include -fsanitize=address,undefined \
              -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_OBJ := $(FUZZ_SRC:%.cpp=$(BUILD)/fuzz/obj/%.o)
FUZZ_BIN := $(FUZZ_TARGETS:%=$(BUILD)/fuzz/fuzz_%)
.SECONDARY: $(FUZZ_OBJ)

$(BUILD)/fuzz/obj/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@

$(BUILD)/fuzz/fuzz_%: tests/fuzz/libfuzzer_main.cpp $(FUZZ_OBJ)
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer -DQOPT_FUZZ_TARGET=$* $^ -o $@

fuzz: $(FUZZ_BIN)
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(BUILD)/fuzz/corpus/$$t $(BUILD)/fuzz/crashes tests/fuzz/corpus/$$t; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
	  $(BUILD)/fuzz/fuzz_$$t $(BUILD)/fuzz/corpus/$$t tests/fuzz/corpus/$$t -max_total_time=$(FUZZ_SECONDS) \
	    -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
	    -artifact_prefix=$(BUILD)/fuzz/crashes/$$t- 2>&1 | grep -E "^(stat::|#[0-9]+ *DONE|==[0-9]+==|SUMMARY|artifact)" ; \
	  test $${PIPESTATUS[0]} -eq 0 || { echo "fuzz: $$t found a crash (build/fuzz/crashes/$$t-*)"; exit 1; }; \
	done
	@echo "fuzz: sweep_config (tools/sweep.py, Python) for $(FUZZ_SECONDS) s"
	python3 tools/fuzz_sweep_config.py --seconds $(FUZZ_SECONDS) --corpus tests/fuzz/corpus/sweep_config

fuzz-merge: $(FUZZ_BIN)
	@for t in $(FUZZ_TARGETS); do \
	  $(BUILD)/fuzz/fuzz_$$t -merge=1 tests/fuzz/corpus/$$t $(BUILD)/fuzz/corpus/$$t 2>&1 | tail -n 1; \
	done

# The crash-safety soak on the GPU (see tools/soak.py): gpt2-124m on the bundled data, killed
# SOAK_KILLS times at random moments, against an uninterrupted run.
SOAK_KILLS ?= 20
soak: all
	python3 tools/soak.py --bin-dir $(BUILD)/bin --out-dir $(BUILD)/soak --kills $(SOAK_KILLS) --min-delay 2 \
	  --max-delay 15 --report $(BUILD)/soak_report.json -- --preset gpt2-124m --device cuda \
	  --train-data '$(DATA_DIR)/brown/brown_train_*.bin' --val-data '$(DATA_DIR)/brown/brown_val_*.bin' \
	  --val-batches 4 -b 8 -t 512 --steps 600 --checkpoint-every 50 --keep-checkpoints 2

# Every object's header dependencies (the binaries' main files too: a stale main object that
# still sees an old class layout links and then misbehaves).
-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
