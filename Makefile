# Two entry points that set themselves up on a machine with only python3.12 and make:
#   make demo   train a small ACT on the embedded demo dataset (Ctrl-C, then `make demo` again resumes)
#   make test   run the test suite
#   make bench  measure speed against lerobot-train and a bare loop; writes docs/benchmarks.md
# The first python3.12 that actually runs: a pyenv shim can be on PATH and still fail ("command not found").
ifeq ($(strip $(PYTHON)),)
PYTHON := $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { command -v "$$p"; break; }; done)
endif
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= outputs/demo
PYTEST_ARGS ?= -q

.PHONY: demo test bench lint clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "python3.12 not found: install it or pass PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) accel_train/train.py --config configs/demo.yaml --output_dir $(DEMO_OUT) --resume_from_checkpoint latest

# The tests also train the policies that need lerobot's extras (Diffusion, SmolVLA, the pi0 family, LoRA).
$(VENV)/.installed-test: $(VENV)/.installed Makefile
	$(PY) -m pip install --quiet -e '.[test,diffusion,smolvla,pi,peft]'
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(PY) benchmarks/compare.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check accel_train tests
	$(VENV)/bin/ruff format --check accel_train tests

clean:
	rm -rf $(VENV) outputs data .pytest_cache
