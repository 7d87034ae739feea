# The two README commands: `make run` (the whole stack on localhost) and `make test` (the suite).
# Both need only Python 3.11+ on the machine; everything else is installed into .venv.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench loadtest image clean lock docs

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

# Installed through constraints.txt: the same versions on every machine, in CI and in the image.
$(STAMP): $(VPY) setup.cfg pyproject.toml constraints.txt
	$(VPY) -m pip install --quiet -c constraints.txt -e '.[test,dev,lint,load]'
	touch $(STAMP)

run: $(STAMP)
	$(VPY) scripts/run-local

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Refresh constraints.txt: resolve setup.cfg's ranges afresh in a scratch venv and pin the result.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[test,dev,lint,load]'
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv
	@echo "constraints.txt refreshed: run make lint test, then commit it"

# Regenerate docs/configuration.md's tables from the settings classes.
docs: $(STAMP)
	$(VPY) -m devtools.configdoc

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache *.egg-info

# Gateway overhead against a direct connection and nginx + limit_req: requests, refusals and
# streamed chats through the real chat service (needs PostgreSQL; --no-chat skips it); see
# CAPACITY_PLANNING.md. Options: make bench BENCH_ARGS="--quick" (or --rounds 5, --markdown FILE,
# --no-chat, ...).
bench: $(STAMP)
	$(VPY) scripts/bench $(BENCH_ARGS)

# Locust users against a local stack it starts and stops; see CAPACITY_PLANNING.md.
# Options: make loadtest LOADTEST_ARGS="--steps 10,50,100 --duration 30" (scripts/loadtest --help).
loadtest: $(STAMP)
	$(VPY) scripts/loadtest $(LOADTEST_ARGS)

# The container image (Dockerfile) with podman: wheels built here, installed offline in the build.
# On a machine that reaches no registry: make image IMAGE_ARGS=--local-base (a Debian base made
# with mmdebstrap). Other options (--tag, --base, ...): scripts/build-image --help.
image: $(VPY)
	PYTHON=$(abspath $(VPY)) scripts/build-image $(IMAGE_ARGS)
