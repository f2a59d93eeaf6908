# deepspike: `make demo` runs the main job end to end, `make test` runs the test suite.
# Both create .venv on first use (apt packages too, as root), installing everything under constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deepspike-installed
# The compiled ops, built into the venv: the CPU kernels of torch.ops.deepspike.lif (module deepspike_ops,
# loaded by models/lif_op.py) and the JPEG window decoder (deepspike_jpeg, dataloaders/decoders.py); this
# stamp says which sources they were built from.
OPS := $(VENV)/.deepspike-ops-built
# What training needs: the compiled ops (g++; libjpeg-dev: deepspike_jpeg's headers) and ffcv's C extension
# (OpenCV, libturbojpeg). The training image (cluster/Dockerfile) installs this list only.
APT_TRAIN := pkg-config g++ libopencv-dev libturbojpeg0-dev libjpeg-dev
# What only the tests and docs need: PostgreSQL for the MLflow server's postgres backend, chromium (+ a font)
# to render the MLflow UI in the browser test and the docs screenshots.
APT_TEST := postgresql chromium fonts-dejavu-core
# TRAINING_ONLY=1 (the training image): training's apt packages and pip extras, no test or benchmark tools.
APT_PKGS := $(APT_TRAIN) $(if $(TRAINING_ONLY),,$(APT_TEST))
TEST_EXTRAS := ,dev,peers,decoders
EXTRAS := ffcv,s3$(if $(TRAINING_ONLY),,$(TEST_EXTRAS))
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml constraints.txt Makefile
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
	  else echo "missing apt packages ($(APT_PKGS)); run as root or install them" >&2; exit 1; fi; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch torchvision setuptools wheel ninja
	# Prebuild DeepSpeed's shm comm op so no rank JIT-compiles it at start-up.
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PIP) install -q --no-build-isolation -c constraints.txt deepspeed
	# compat mode puts the checkout on sys.path, so packages added later need no reinstall.
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]" --config-settings editable_mode=compat
	$(if $(TRAINING_ONLY),,$(PIP) install -q --no-deps spikingjelly==2.0.0)
	$(PY) -c "import torch, torchvision, deepspeed, ray, mlflow, webdataset, ffcv, s3fs; print('stack ok', torch.__version__)"
	$(if $(TRAINING_ONLY),,$(PY) -c "import spikingjelly, moto")
	touch $(STAMP)

$(OPS): models/csrc/lif_cpu.cpp dataloaders/csrc/jpeg_window.c models/csrc/build.py $(STAMP)
	$(PY) models/csrc/build.py
	touch $(OPS)

# Two pytest-xdist workers: on 2 cores one worker left 20-50 % of the CPU idle (the cluster tests wait on Ray
# and on their jobs); tests/conftest.py makes each module one unit of work and the cluster tests another.
TEST_WORKERS ?= 2

test: $(STAMP) $(OPS)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=20 tests

demo: $(STAMP) $(OPS)
	$(PY) -m launch.demo

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP) $(OPS)
	$(PY) -m bench.models

clean-venv:
	rm -rf $(VENV)
