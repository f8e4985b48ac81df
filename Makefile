# Two commands: `make demo` (the whole demo workflow) and `make test` (the test suite); `make
# preprocess` and `make features` stop after those stages (README: Partial runs).
# Both build .venv on first use; it is rebuilt when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2

ARGS ?=
SNAKEMAKE := PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --workflow-profile workflow/profiles/default

.PHONY: demo test venv dry-run cluster-preview clean preprocess features

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[test,slurm]'
	touch $@

demo: venv
	$(SNAKEMAKE) $(ARGS)

# Partial runs (README: Partial runs): every kept slide's preprocessing, or its feature bags (one
# encoder's with ENCODER=<key>); the workflow's options in ARGS, e.g. ARGS="--configfile my.yaml".
preprocess: venv
	$(SNAKEMAKE) preprocess $(ARGS)

features: venv
	$(SNAKEMAKE) $(if $(ENCODER),features_$(ENCODER),features) $(ARGS)

dry-run: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) -n

# What each sbatch job of a SLURM run would ask for (a dry run with workflow/profiles/slurm);
# further Snakemake arguments in ARGS, e.g. make cluster-preview ARGS='--config slides=cohort.csv'
cluster-preview: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/msamil cluster-preview -- $(ARGS)

test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf results logs benchmarks demo_data .snakemake
