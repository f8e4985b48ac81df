# Two commands: `make demo` (the whole demo workflow) and `make test` (the test suite).
# Both build .venv on first use; it is rebuilt when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: demo test venv dry-run cluster-preview clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[test,slurm]'
	touch $@

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --workflow-profile workflow/profiles/default

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
