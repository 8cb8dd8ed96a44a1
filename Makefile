# `make demo` and `make test` set up everything they need (a venv in .venv, the Jupyter kernel) on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
KERNEL := photo-retrieval
FAISS  := $(if $(GPU),requirements-gpu.txt,requirements-cpu.txt)
STAMP  := $(VENV)/.installed-$(if $(GPU),gpu,cpu)

.PHONY: setup demo run test bench browse
setup: $(STAMP)

$(STAMP): requirements.txt $(FAISS) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -r $(FAISS)
	# the project itself, editable: lib and data_prep import from anywhere, and the photo-predict command;
	# --no-deps because the pinned files above are the only source of versions (see pyproject.toml).
	$(PY) -m pip install --no-deps -e .
	# papermill starts notebooks in this kernel; --sys-prefix keeps it inside the venv.
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python ($(KERNEL))"
	rm -f $(VENV)/.installed-*
	touch $@

# Every numbered notebook, headless, in order, on the demo data (made on first run).
demo: setup
	$(PY) notebooks/run_all.py

# Your photos, notebooks 01-05 with their real-photo defaults: make run DATA=<photo folder or metadata CSV>
# [RUN=name: runs/<name>, splits/<name>; default DATA's folder name] [ARGS="-p epochs 3 -p task reid"].
# A second call carries on where the first stopped.
run: setup
	@test -n "$(DATA)" || { echo 'make run DATA=<photo folder or metadata CSV> [RUN=name] [ARGS="-p epochs 3"]'; exit 2; }
	$(PY) notebooks/run_photos.py "$(DATA)" $(if $(RUN),--run "$(RUN)") $(ARGS)

# one worker per core (at most 4: each holds its own torch and demo fixtures), an idle worker taking tests from a
# busy one's queue (the slow tests are few and long); the 15 slowest tests are listed at the end
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal --durations=15 tests

bench: setup
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

# Notebook 05's query browser as a web page (Voila) on 127.0.0.1: RUN=runs/<name>, default the run evaluated last.
browse: setup
	$(PY) -m lib.analysis.browse_server $(if $(RUN),--run $(RUN))
