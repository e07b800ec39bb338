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
