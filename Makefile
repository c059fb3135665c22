# The two commands a new user needs: `make run` and `make test`.
# Both create the virtual environments when missing and install idempotently:
# a stamp file keyed on pyproject.toml makes a second call skip pip entirely.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)
# Label Studio lives in its own environment: its pins are not the project's.
LS_VENV := .venv-labelstudio
LS_VERSION := 1.23.2
LS_STAMP := $(LS_VENV)/.installed-$(LS_VERSION)
# MediaPipe's face-landmark model, extracted from its pinned wheel (tasks/preprocess/face_mesh.py).
FACE_MESH := $(VENV)/share/affectloop/face_landmark.tflite
DATA ?= data

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export TF_CPP_MIN_LOG_LEVEL := 3
export TF_ENABLE_ONEDNN_OPTS := 0
export DASK_LOGGING__DISTRIBUTED := warning

.PHONY: run test install labelstudio-install unit clean help

help:
	@echo "make run   - set everything up and run the whole loop once on generated demo data"
	@echo "make test  - set everything up and run the test suite (unit + real-service tier)"

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "affectloop needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

$(FACE_MESH): | $(STAMP)
	$(PY) -c 'from tasks.preprocess.face_mesh import main; raise SystemExit(main(["install"]))'

install: $(STAMP) $(FACE_MESH)

$(LS_STAMP):
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -qq --upgrade pip
	$(LS_VENV)/bin/python -m pip install -qq 'label-studio==$(LS_VERSION)'
	rm -f $(LS_VENV)/.installed-*
	touch $@

labelstudio-install: $(LS_STAMP)

run: install labelstudio-install
	$(VENV)/bin/affectloop loop --data-root $(DATA) --demo

test: install labelstudio-install
	$(PY) -m pytest -q -p no:cacheprovider tests

unit: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not service" tests

clean:
	rm -rf $(DATA) reports
