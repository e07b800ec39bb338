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
# a hung MPI test must not hang CI: every MPI suite runs under a hard time limit (s)
MPI_TIMEOUT ?= 900
# the MPI suites run at each of these rank counts (an even and an uneven split)
MPI_RANKS ?= 2 3

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
	MPIRUN="$(MPIRUN)" PY="$(PY)" RANKS="$(MPI_RANKS)" MPI_TIMEOUT=$(MPI_TIMEOUT) bash run/test-mpi.sh

clean:
	rm -rf demo .pytest_cache
