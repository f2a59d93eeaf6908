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
# libjpeg-dev: deepspike_jpeg's headers. chromium (+ a font) renders the MLflow UI in the browser test and the docs screenshots.
APT_PKGS := pkg-config g++ libopencv-dev libturbojpeg0-dev libjpeg-dev postgresql chromium fonts-dejavu-core
export DS_ACCELERATOR ?= cpu
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
	$(PIP) install -q -c constraints.txt -e ".[ffcv,dev,peers,decoders,s3]" --config-settings editable_mode=compat
	$(PIP) install -q --no-deps spikingjelly==2.0.0
	$(PY) -c "import torch, torchvision, deepspeed, ray, mlflow, webdataset, ffcv, spikingjelly, s3fs, moto; print('stack ok', torch.__version__)"
	touch $(STAMP)

$(OPS): models/csrc/lif_cpu.cpp dataloaders/csrc/jpeg_window.c models/csrc/build.py $(STAMP)
	$(PY) models/csrc/build.py
	touch $(OPS)

test: $(STAMP) $(OPS)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

demo: $(STAMP) $(OPS)
	$(PY) -m launch.demo

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP) $(OPS)
	$(PY) -m bench.models

clean-venv:
	rm -rf $(VENV)
