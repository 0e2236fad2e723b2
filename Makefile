# fisao: `make run` builds and runs the demo campaign, `make test` runs the tests.
# Both create .venv and install requirements.lock the first time (and again only when the
# lock or pyproject.toml changes); `make test` and `make peers` also install the `peers` extra
# (TRL, pinned in requirements-peers.lock), which `make run` and `make install` leave out.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PEERS  := $(VENV)/.peers
CONFIG ?= configs/demo.yaml

# Nothing here may reach the internet: telemetry and update checks off, hubs offline.
export DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_DATASETS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test test-fast peers lock mlflow-ui deploy clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m runner.ephemeral  # Prefect's empty database, migrated once for every new project
	@touch $(STAMP)

# The peer methods' extra (TRL, datasets), on top of the main install: the exact versions of
# requirements-peers.lock, which move no pin of requirements.lock.
$(PEERS): $(STAMP) requirements-peers.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-peers.lock
	@touch $(PEERS)

run: $(STAMP)
	$(BIN)/fisao run --config $(CONFIG)

# The tests of the peer methods (tests/test_peers_*.py) need the extra; here a missing trl fails
# them instead of skipping them (FISAO_REQUIRE_PEERS, tests/conftest.py `needs_peers`).
test: $(PEERS)
	FISAO_REQUIRE_PEERS=1 $(BIN)/python -m pytest

# Unit tests only (skips the end-to-end runs with Prefect, MLflow and DVC).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e"

# The deployments of prefect.yaml on the process pool, on the server PREFECT_API_URL names (see
# docs/scheduling.md). The GPU campaign needs its own pool first (the comment atop prefect.yaml).
DEPLOYMENTS := demo-campaign nightly-campaign evaluate-checkpoint world
deploy: $(STAMP)
	@test -n "$$PREFECT_API_URL" || { echo "set PREFECT_API_URL to a running prefect server (docs/scheduling.md)"; exit 2; }
	$(BIN)/prefect work-pool inspect fisao-process >/dev/null 2>&1 || $(BIN)/prefect work-pool create fisao-process --type process
	FISAO_CHECKOUT=$${FISAO_CHECKOUT:-$(CURDIR)} $(BIN)/prefect --no-prompt deploy $(addprefix -n ,$(DEPLOYMENTS))

# FiSAO beside TRL's GRPO and CSR-style DPO on the demo world (world seed 0), 3 rounds, 3 seeds,
# each method's learning rate picked on the val split first (--tune; bench/peers.py, issue 14).
# PEERS_ARGS changes them: make peers PEERS_ARGS="--world 0 --seeds 0 --rounds 1 --out outputs/peers-quick".
PEERS_ARGS ?= --world 0 --seeds 0,1,2 --rounds 3 --tune --out outputs/peers
peers: $(PEERS)
	$(BIN)/python bench/peers.py $(PEERS_ARGS)

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# Re-resolve the loose ranges of pyproject.toml into an exact lock (run after changing them).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet -e '.[test]'
	{ echo '# Exact versions tested together (Python 3.11, CPU). Regenerate with `make lock`; torch comes from local disk.'; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > requirements.lock
	.lock-venv/bin/python -m pip install --quiet -e '.[peers]'
	.lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' > .lock-venv/peers.txt
	@moved=$$(grep -v '^#' requirements.lock | grep -vxFf .lock-venv/peers.txt); \
	  test -z "$$moved" || { echo "the peers extra moves pins of requirements.lock: $$moved"; exit 1; }
	{ echo '# The `peers` extra (pyproject.toml): the packages `pip install -e .[peers]` adds to an environment of'; \
	  echo '# requirements.lock (Python 3.11, CPU), only those; it moves none of its pins. Installed after it.'; \
	  echo '# Regenerate with `make lock`.'; \
	  grep -vxFf requirements.lock .lock-venv/peers.txt; } > requirements-peers.lock
	rm -rf .lock-venv

clean:
	rm -rf outputs .prefect mlflow.db mlartifacts
