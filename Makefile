# convert: make install | demo | test | test-fast | lint | bench | fuzz | clean
# Everything runs inside a project virtualenv (.venv); `make install` creates it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= out

.PHONY: install demo test test-fast lint bench fuzz clean

install: $(STAMP)

# The test environment is pinned by constraints.txt (torch must be exactly 2.13.0: its CPU
# build is cached on the project machines; anything else pulls GBs of CUDA packages).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# The main job on the bundled example: a TensorFlow checkpoint folder (examples/model1, written by
# tf.compat.v1.train.Saver) to safetensors and back to a V2 checkpoint (diff: identical), a V1
# checkpoint migrated to V2, and the weights mapped to PyTorch names and layouts.
demo: install
	rm -rf $(OUT) && mkdir -p $(OUT)
	$(BIN)/convert inspect examples/model1
	$(BIN)/convert tf-ckpt examples/model1 --to safetensors -o $(OUT)/model1.safetensors
	$(BIN)/convert safetensors $(OUT)/model1.safetensors --to tf-ckpt -o $(OUT)/model1-roundtrip
	$(BIN)/convert tf-ckpt examples/model1_v1 --to tf-ckpt -o $(OUT)/model1-migrated
	$(BIN)/convert diff $(OUT)/model1-roundtrip examples/model1
	$(BIN)/convert tf-ckpt examples/model1 --to torch -o $(OUT)/model1.pt \
	    --map tf1-to-torch --map drop-optimizer --map mappings/examples/mnist-cnn-tf1-to-torch.yaml
	$(BIN)/convert inspect $(OUT)/model1.pt

# The whole suite, slow tests included (this is what CI runs).
test: install
	$(BIN)/python -m pytest -q

# The quick loop while developing.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" -x

lint: install
	$(BIN)/ruff check convert tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench.py

# The parser fuzzer at length: 20,000 random inputs per target (11 targets, ~30 min on one core);
# the test suite runs the same harness derandomized, 500 per target. FUZZ_EXAMPLES=N to change.
FUZZ_EXAMPLES ?= 20000
fuzz: install
	CONVERT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(OUT) build dist *.egg-info .pytest_cache .ruff_cache

# ---------------------------------------------------------------------------------------------
# How a pipeline uses convert: pattern rules. Outputs are atomic (a failed conversion leaves no
# file for make to mistake as up to date), the exit status is non-zero on failure, --quiet keeps
# logs clean and the bytes are the same on every run. E.g. `make $(OUT)/model1.safetensors`.
$(OUT)/%.safetensors: examples/%/checkpoint | install
	@mkdir -p $(@D)
	$(BIN)/convert tf-ckpt examples/$* --to safetensors -o $@ --force --quiet

$(OUT)/%.pt: $(OUT)/%.safetensors | install
	$(BIN)/convert safetensors $< --to torch -o $@ --force --quiet
