# `make demo` and `make test` each do all the set-up on a fresh Debian machine (as root),
# and are quick no-ops for set-up when it is already done.
PY      := .venv/bin/python
STAMPS  := .stamps
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
APT_PKGS := dataset-fashion-mnist redis-server

.PHONY: setup demo test test-fast protos clean

setup: $(STAMPS)/apt $(STAMPS)/venv

$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@if [ ! -f $(FMNIST) ] || ! command -v redis-server >/dev/null; then \
	  echo "[setup] apt-get install $(APT_PKGS)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	@echo "[setup] python venv in .venv and pip install -e .[service,tracking,test]"
	@[ -x $(PY) ] || python3 -m venv .venv
	@$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	@# setuptools' notice about editable installs is information only: silenced at its source
	@PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[service,tracking,test]' 2>&1 \
	  | grep -v "^WARNING: Location" || true
	@$(PY) -c "import mtkd, torch, ray, grpc" || { echo "[setup] install failed"; exit 1; }
	@touch $@

demo: setup
	.venv/bin/mtkd demo

test: setup
	$(PY) -m pytest -q -ra --durations=25 -n 2 --dist loadscope

# Skips the slow end-to-end and Ray tests (gRPC servers and redis-server on loopback still run).
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not ray"

protos: setup
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(STAMPS) runs cache
