# Set-up is part of every target: a fresh machine with Python 3.11 needs only `make demo` / `make test`.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
# Apache Beam pins older protobuf/pyarrow/pillow than the main stack: its pipeline test runs in a
# second venv with the `beam` extra.
BEAM_VENV := .venv-beam
BEAM_STAMP := $(BEAM_VENV)/.installed

$(STAMP): EXTRAS := test
$(BEAM_STAMP): EXTRAS := test,beam
$(STAMP) $(BEAM_STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install -q --upgrade pip
	$(@D)/bin/pip install -q -e '.[$(EXTRAS)]'
	touch $@

# The tests also need the `torch` extra (PyTorch, torchvision, pytorchvideo, transformers) to check
# weight conversion against the PyTorch models; the demo does not.
TORCH_STAMP := $(VENV)/.installed-torch
$(TORCH_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q -e '.[test,torch]'
	touch $@

# Test files run in parallel worker processes (pytest-xdist), a whole file per worker so that its
# module fixtures are built once: most of the suite is single-threaded XLA compilation.
TEST_WORKERS ?= 2

# Programs run with jemalloc (else tcmalloc) as the C heap where one is installed (XLA compiles
# faster; CMR_JAX_MALLOC=glibc for glibc's malloc): see launch/with_allocator.sh.
RUN := launch/with_allocator.sh

.PHONY: demo test install
install: $(STAMP)

demo: $(STAMP)
	$(RUN) $(VENV)/bin/python tools/demo.py --workdir=runs/demo

test: $(TORCH_STAMP) $(BEAM_STAMP)
	CMR_JAX_REQUIRE_TORCH=1 $(RUN) $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) \
	    --dist loadfile tests --ignore=tests/test_beam_ingest.py
	CMR_JAX_REQUIRE_BEAM=1 $(RUN) $(BEAM_VENV)/bin/python -m pytest -q tests/test_beam_ingest.py
