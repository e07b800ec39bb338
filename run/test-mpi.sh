#!/usr/bin/env bash
# The MPI suites: every file of tests/mpi/ under `mpirun -n N` for each N in $RANKS (default
# "2 3": an even and an uneven split), each file in its own mpirun under a hard time limit so
# that one failing (aborted) suite does not hide the others; exit 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MPIRUN=${MPIRUN:-mpirun}
RANKS=${RANKS:-2 3}
LIMIT_S=${MPI_TIMEOUT:-900}
# As `dynshift run` does for its ranks (engine/context.py): ranks yield the core while they
# wait, and each runs one thread per pool. 3 ranks on a 2-core machine with Open MPI busy-polling
# and OpenMP / TensorFlow pools of 2 threads each spun for minutes in an MPI suite (CI, once).
export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
for pool in OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS TF_NUM_INTRAOP_THREADS \
            TF_NUM_INTEROP_THREADS DP_INTRA_OP_PARALLELISM_THREADS DP_INTER_OP_PARALLELISM_THREADS \
            NUMBA_NUM_THREADS; do
  export "$pool=${!pool:-1}"
done
failed=()
n_runs=0
for n in $RANKS; do
  for suite in tests/mpi/test_*.py; do
    n_runs=$((n_runs + 1))
    echo "== mpirun -n $n $suite"
    if ! timeout -s KILL "$LIMIT_S" $MPIRUN -n "$n" "$PY" -m pytest -q --color=no -p no:cacheprovider "$suite"; then
      failed+=("-n $n $suite")
    fi
  done
done
if (( ${#failed[@]} )); then
  echo "MPI suites: ${#failed[@]} of $n_runs runs failed:"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "MPI suites: all $n_runs runs passed (ranks: $RANKS)"
