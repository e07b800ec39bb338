#!/usr/bin/env bash
# Idempotent installer for dynshift: system MPI + parallel HDF5 (when root and apt exist),
# a virtual environment .venv with deepmd-kit[cpu] (TensorFlow), dscribe, mpi4py, h5py built
# against the MPI HDF5, and Horovod built with MPI + TensorFlow.  A second run takes seconds.
# Every pip install uses run/constraints.txt: the exact versions the tests ran with (on the
# Python minor version named in it; DYNSHIFT_CONSTRAINTS= installs without pins, e.g. on a
# Python that the pinned releases have no wheels for).
#
# DYNSHIFT_GPAW=1 (the default; 0 skips it) also installs the GPAW labeller (docs/label.md):
# Debian's libxc-dev and libopenblas-dev (GPAW links libxc only where a BLAS is found too), then
# gpaw built from its sdist against the system MPI and libxc, and gpaw-data (PAW setups, LCAO
# bases). It adds about 70 s to a fresh install (measured: apt 6 s, pip 62 s).
#
# On a cluster (no root): load modules that provide mpicc and a parallel HDF5 first, e.g.
#   module load openmpi hdf5/parallel cmake gcc
#   HDF5_DIR=$HDF5_ROOT bash run/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${DYNSHIFT_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMP=$VENV/.dynshift-installed
HOROVOD_VERSION=0.28.1
CONSTRAINTS=${DYNSHIFT_CONSTRAINTS-$ROOT/run/constraints.txt}
GPAW=${DYNSHIFT_GPAW:-1}
say() { printf '[install] %s\n' "$*"; }

# The stamp records the inputs of this install; if they are unchanged we are done.
want_stamp="$( (sha256sum run/install.sh setup.py ${CONSTRAINTS:+"$CONSTRAINTS"}
                echo "gpaw=$GPAW") | sha256sum | cut -c1-16)"
if [[ -f $STAMP && "$(cat "$STAMP")" == "$want_stamp" ]]; then
  exit 0
fi

# 1. System packages (only as root with apt; on clusters use modules instead).
need_apt=0
for cmd in mpicc mpirun pkg-config cmake g++; do command -v "$cmd" >/dev/null || need_apt=1; done
[[ -f /usr/include/hdf5/openmpi/hdf5.h || -n "${HDF5_DIR:-}" ]] || need_apt=1
gpaw_apt=()
if [[ $GPAW == 1 ]] && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  if ! dpkg -s libxc-dev libopenblas-dev >/dev/null 2>&1; then
    need_apt=1
    gpaw_apt=(libxc-dev libopenblas-dev)
  fi
fi
if [[ $need_apt == 1 ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "apt: openmpi, parallel hdf5, build tools${gpaw_apt[*]:+, libxc and openblas (gpaw)}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev libhdf5-openmpi-dev \
      pkg-config cmake g++ make ${gpaw_apt[@]+"${gpaw_apt[@]}"} >/dev/null
  else
    echo "install: need mpicc, mpirun, cmake, g++ and a parallel HDF5 (set HDF5_DIR);" \
         "load your cluster's modules or run as root on Debian/Ubuntu" >&2
    exit 1
  fi
fi
if [[ -z "${HDF5_DIR:-}" && -d /usr/lib/x86_64-linux-gnu/hdf5/openmpi ]]; then
  export HDF5_DIR=/usr/lib/x86_64-linux-gnu/hdf5/openmpi
fi

# 2. Virtual environment and the Python stack.
[[ -x $VENV/bin/python ]] || { say "venv $VENV"; "$PY" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip"
PIN=()
if [[ -n $CONSTRAINTS ]]; then
  PIN=(-c "$CONSTRAINTS")
  tested=$(sed -n 's/^# python: *//p' "$CONSTRAINTS")
  have=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [[ -z $tested || $have == "$tested" ]] || say "python $have: the pins of $CONSTRAINTS were" \
    "tested on $tested; if pip finds no release for them, DYNSHIFT_CONSTRAINTS= installs unpinned"
fi
$PIP install -q ${PIN[@]+"${PIN[@]}"} --upgrade pip "setuptools>=70" wheel
say "python packages${CONSTRAINTS:+ (versions of $CONSTRAINTS)}"
# nvidia-cuda-runtime-cu12: deepmd-kit's one wheel is built for CUDA 12 and loads libcudart
# when its TF ops load (even on a CPU); without it, every process prints ~12 lines of
# "Cannot find libcudart.so.12" / "implib-gen: ... failed to resolve symbol"
$PIP install -q ${PIN[@]+"${PIN[@]}"} "deepmd-kit[cpu]" "dscribe>=2.1" "mpi4py>=3.1" \
  "pydantic>=2.5" PyYAML "ase>=3.23" numba dpdata matplotlib pytest "Cython>=3" pkgconfig numpy \
  cloudpickle psutil packaging threadpoolctl nvidia-cuda-runtime-cu12 nmrglue scipy emcee

# 3. h5py against the MPI HDF5.
if ! "$VENV/bin/python" -c 'import h5py,sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; then
  say "h5py (MPI build, from source)"
  CC=mpicc HDF5_MPI=ON $PIP install -q ${PIN[@]+"${PIN[@]}"} --no-build-isolation --no-binary=h5py \
    --force-reinstall --no-deps h5py
fi
"$VENV/bin/python" -c 'import h5py; assert h5py.get_config().mpi, "h5py is not an MPI build"'

# 4. Horovod with MPI + TensorFlow (drop the XLA source the TF wheel has no headers for).
if ! "$VENV/bin/python" -c 'import horovod.tensorflow as h; assert h.mpi_built()' 2>/dev/null; then
  say "horovod $HOROVOD_VERSION (build from sdist, ~3 min)"
  work=$(mktemp -d)
  (cd "$work" && $PIP download -q ${PIN[@]+"${PIN[@]}"} --no-deps --no-binary=:all: \
     "horovod==$HOROVOD_VERSION" -d . \
     && tar xzf horovod-$HOROVOD_VERSION.tar.gz)
  sed -i '/xla_mpi_ops.cc/d' "$work/horovod-$HOROVOD_VERSION/horovod/tensorflow/CMakeLists.txt"
  (cd "$work/horovod-$HOROVOD_VERSION" && \
    HOROVOD_WITH_MPI=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 \
    HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j2 $PIP install -q ${PIN[@]+"${PIN[@]}"} \
      --no-build-isolation --no-deps . )
  rm -rf "$work"
fi
"$VENV/bin/python" -c 'import horovod.tensorflow as h; assert h.mpi_built(), "horovod lacks MPI"'

# 5. GPAW (the gpaw labeller) against the system MPI, libxc and BLAS; its PAW setups come from
# gpaw-data (found by `import gpaw_data`, no GPAW_SETUP_PATH needed). A cluster without root
# loads a libxc module first (or gets GPAW's built-in LDA/PBE only: `gpaw info` says).
if [[ $GPAW == 1 ]]; then
  if ! "$VENV/bin/python" -c \
      'import gpaw_data, gpaw.cgpaw as c, sys; sys.exit(0 if c.have_mpi else 1)' 2>/dev/null; then
    say "gpaw + gpaw-data (gpaw built from its sdist, ~1 min)"
    $PIP install -q ${PIN[@]+"${PIN[@]}"} --no-binary=gpaw gpaw gpaw-data
  fi
  "$VENV/bin/python" -c 'import gpaw.cgpaw as c; assert c.have_mpi, "gpaw is not an MPI build"'
  "$VENV/bin/python" -c 'import gpaw, sys; sys.exit(0 if gpaw.get_libraries()["libxc"] else 1)' \
    || say "gpaw has no libxc (only its built-in LDA/PBE): install libxc-dev, then" \
           "$PIP install --force-reinstall --no-deps --no-cache-dir gpaw"
fi

# 6. dynshift itself (editable).
$PIP install -q ${PIN[@]+"${PIN[@]}"} --no-deps --no-build-isolation -e .
echo "$want_stamp" > "$STAMP"
say "done: $VENV"
