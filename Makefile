# dynshift: `make demo` runs the default job, `make test` runs every test (installs on first use).
VENV    ?= .venv
PY      := $(VENV)/bin/python
RANKS   ?= 2
# OpenMPI refuses root without these (containers, CI); harmless elsewhere.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_btl_vader_single_copy_mechanism := none
export OMPI_MCA_rmaps_base_oversubscribe := 1
export HDF5_USE_FILE_LOCKING := FALSE
MPIRUN  ?= mpirun
# a hung MPI test must not hang CI: every MPI suite runs under a hard time limit
MPI_TIMEOUT ?= 1800

.PHONY: install demo test test-serial test-mpi clean

install:
	@bash run/install.sh

demo: install
	$(MPIRUN) -n $(RANKS) $(VENV)/bin/dynshift run run/default.yaml --store demo/dynshift-demo.h5
	$(VENV)/bin/dynshift show demo/dynshift-demo.h5

test: install test-serial test-mpi

test-serial:
	$(PY) -m pytest -q tests --ignore=tests/mpi

test-mpi:
	timeout -s KILL $(MPI_TIMEOUT) $(MPIRUN) -n 2 $(PY) -m pytest -q -p no:cacheprovider tests/mpi

clean:
	rm -rf demo .pytest_cache
