# convert: make demo | install | test | test-fast | lint | docs | bench | fuzz | fuzz-coverage | crash | clean
# The demo runs in its own virtualenv with the core install only (.venv-demo: the package and its
# core dependencies, no framework); everything else in the test virtualenv (.venv, `make install`).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_VENV ?= .venv-demo
DEMO   := $(DEMO_VENV)/bin
OUT    ?= out

.PHONY: install demo-install demo browser test test-fast lint docs bench fuzz fuzz-coverage crash clean

install: $(STAMP)

# The test environment is pinned by constraints.txt (torch must be exactly 2.13.0: its CPU
# build is cached on the project machines; anything else pulls GBs of CUDA packages).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# What a new user installs: `pip install ckpt-convert`, no extras (about 20 s with a warm pip cache).
demo-install: $(DEMO_VENV)/.installed-stamp

$(DEMO_VENV)/.installed-stamp: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO)/pip install --quiet -c constraints.txt -e .
	touch $@

# The seed's scenarios on the bundled example (examples/model1: a tf.compat.v1.train.Saver folder;
# examples/model1_v1: the same model saved as V1), with no framework installed. Each step's
# command is printed before its output; a step that fails stops the demo.
demo: demo-install
	rm -rf $(OUT) && mkdir -p $(OUT)
	@echo; echo "== 0. The core install: no framework (convert --version lists what is optional)"
	$(DEMO)/convert --version
	@echo; echo "== 1. What a TensorFlow checkpoint holds (headers only)"
	$(DEMO)/convert inspect examples/model1
	@echo; echo "== 2. TF -> safetensors -> TF, and the round trip compared with the original"
	$(DEMO)/convert tf-ckpt examples/model1 --to safetensors -o $(OUT)/model1.safetensors
	$(DEMO)/convert safetensors $(OUT)/model1.safetensors --to tf-ckpt -o $(OUT)/model1-roundtrip
	$(DEMO)/convert diff $(OUT)/model1-roundtrip examples/model1
	@echo; echo "== 3. A V1 checkpoint migrated to V2 with its .meta graph, without TensorFlow"
	$(DEMO)/convert tf-ckpt examples/model1_v1 --to tf-ckpt -o $(OUT)/model1-migrated
	ls $(OUT)/model1-migrated
	$(DEMO)/convert diff $(OUT)/model1-migrated examples/model1_v1
	@echo; echo "== 4. TF -> PyTorch names and layouts (a torch.load(weights_only=True) state_dict)"
	$(DEMO)/convert tf-ckpt examples/model1 --to torch -o $(OUT)/model1.pt \
	    --map tf1-to-torch --map drop-optimizer --map mappings/examples/mnist-cnn-tf1-to-torch.yaml
	$(DEMO)/convert inspect $(OUT)/model1.pt
	@echo; echo "== 5. The torch weights back into the TF graph: names resolved against it, optimizer slots filled from it"
	$(DEMO)/convert torch $(OUT)/model1.pt --to tf-ckpt -o $(OUT)/model1-from-torch \
	    --map torch-to-tf1 --map mappings/examples/mnist-cnn-torch-to-tf1.yaml \
	    --template examples/model1 --template-fill
	$(DEMO)/convert diff $(OUT)/model1-from-torch examples/model1
	@echo; echo "Done: the outputs are in $(OUT)/. 'make test' installs the frameworks and runs the suite."

# Headless Chromium for the HTML report's browser test (tests/test_report.py): Debian's package,
# installed when missing if this is root with apt-get; otherwise that test is skipped, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report's browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "note: apt-get could not install chromium: the browser test will be skipped"; \
	  else echo "note: no chromium, and no root apt-get to install it: the browser test will be skipped"; fi; }

# The whole suite, slow tests included, the API reference's strict build among them (this is what CI runs).
test: install browser
	$(BIN)/python -m pytest -q

# The quick loop while developing.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" -x

# Style (ruff), types over the package (mypy: every adapter's FORMAT against the contract of
# convert/formats/base.py), the import layers (lint-imports; pyproject.toml lists them) and no
# import cycle between modules, a package's own included (tests/test_lint.py).
# tests/test_lint.py runs the last two in `make test`, so CI checks them too.
lint: install
	$(BIN)/ruff check convert tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_lint.py -k "cycle_between_modules or cycle_check"

# The Python API reference (docs/, from the docstrings, by Sphinx) into site/: -W -n fails on any
# warning, a broken reference among them (tests/test_docs.py runs the same build in `make test`).
docs: install
	$(BIN)/python -m sphinx -W -n --keep-going -q -b html docs site

# The default scenarios (about 15 minutes; benchmarks/README.md). BENCH_ARGS adds options, e.g. the
# scenarios that are off by default, alone (the curves and remote ones left out):
#   make bench BENCH_ARGS="--only batch --batch-runs 200 --curve= --tensor-curve= --remote-mb 0"
#   make bench BENCH_ARGS="--only hf --hf-gb 1,16 --repeat 3 --curve= --tensor-curve= --remote-mb 0"
BENCH_ARGS ?=
bench: install
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

# The parser fuzzer at length: 20,000 random inputs per target (11 targets, ~30 min on one core);
# the test suite runs the same harness derandomized, 500 per target. FUZZ_EXAMPLES=N to change.
FUZZ_EXAMPLES ?= 20000
fuzz: install
	CONVERT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py -q -p no:cacheprovider

# Coverage-guided fuzzing (tests/fuzz_coverage.py, atheris): every target for FUZZ_SECONDS, all in
# parallel under nice -n 19, from a corpus of convert's own outputs and the real files of
# ../shared/corpus; then each corpus minimized and its small inputs kept in tests/data/fuzz/ (which
# tests/test_fuzz_corpus.py replays in `make test`). Logs and crashes: $(OUT)/fuzz/.
FUZZ_SECONDS ?= 1800
FUZZ_TARGETS := safetensors onnx gguf tflite sstable_v1 sstable_v2 torch_zip torch_pickle torch_legacy metagraph
fuzz-coverage: install
	$(BIN)/pip install --quiet atheris
	rm -rf $(OUT)/fuzz && $(BIN)/python tests/fuzz_coverage.py seed $(OUT)/fuzz/corpus
	for t in $(FUZZ_TARGETS); do mkdir -p $(OUT)/fuzz/crashes/$$t; \
	  nice -n 19 $(BIN)/python tests/fuzz_coverage.py run $$t $(OUT)/fuzz/corpus/$$t -max_total_time=$(FUZZ_SECONDS) \
	    -timeout=30 -rss_limit_mb=3000 -print_final_stats=1 -artifact_prefix=$(OUT)/fuzz/crashes/$$t/ \
	    > $(OUT)/fuzz/$$t.log 2>&1 & done; wait
	grep -H "stat::number_of_executed_units\|^Done" $(OUT)/fuzz/*.log; ls -R $(OUT)/fuzz/crashes
	$(BIN)/python tests/fuzz_coverage.py keep $(OUT)/fuzz/corpus

# Power cuts at length (tests/test_powercut.py): every subset of pending changes a file system may
# persist is tried up to 16 of them (10 in the suite), and the next run is cut in turn wherever a
# staging folder with a journal is left, up to 50 per writer (3 in the suite, where recovery moves
# outputs back); one line per writer with its counts. Needs strace (Linux).
crash: install
	CONVERT_CRASH_FULL=1 $(BIN)/python -m pytest tests/test_powercut.py -q -s -p no:cacheprovider

clean:
	rm -rf $(VENV) $(DEMO_VENV) $(OUT) site build dist *.egg-info .pytest_cache .ruff_cache

# ---------------------------------------------------------------------------------------------
# How a pipeline uses convert: pattern rules. Outputs are atomic (a failed conversion leaves no
# file for make to mistake as up to date), the exit status is non-zero on failure, --quiet keeps
# logs clean and the bytes are the same on every run. E.g. `make $(OUT)/model1.safetensors`.
$(OUT)/%.safetensors: examples/%/checkpoint | install
	@mkdir -p $(@D)
	$(BIN)/convert tf-ckpt examples/$* --to safetensors -o $@ --force --quiet

$(OUT)/%.pt: $(OUT)/%.safetensors | install
	$(BIN)/convert safetensors $< --to torch -o $@ --force --quiet
