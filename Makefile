# Entry points: `make repro` runs the pipeline, `make test` runs the tests.
# Both create the virtual environment and fetch the dataset when missing.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# DVC runs stage commands through the shell; `python` must be the venv's.
export PATH := $(BIN):$(PATH)
export PYTHON := $(BIN)/python

# Shrunk params for a run of about a minute (quality is meaningless at this size).
QUICK_PARAMS := -S data.limit=2000 -S train_evaluator.epochs=1 -S train_gan.epochs=2 \
	-S generate.num_samples=1000 -S score.num_calibration=400 -S finetune.steps=20 \
	-S evaluate.num_samples=300 -S threshold=0.3

.PHONY: setup data repro quick test ui report ui-check

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	touch $@

data: setup
	scripts/ensure_data.sh

repro: data
	dvc repro

quick: data
	dvc exp run $(QUICK_PARAMS)

test: data
	python -m pytest -q

# The MLflow UI on http://127.0.0.1:5000, bound to loopback only.
ui: setup
	mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

# The threshold trade-off (reports/tradeoff.png, .csv, .md) and the seed means (reports/seeds.csv, .md) from the MLflow runs.
report: setup
	python -m rsft.report --output reports

# Screenshot the MLflow compare view of two runs in headless Chromium (needs `apt-get install chromium`).
ui-check: setup
	python scripts/check_mlflow_ui.py --output ui-check
