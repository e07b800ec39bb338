"""dynshift: machine-learned MD to dynamic NMR shifts, as one MPI batch engine."""
from setuptools import find_packages, setup

setup(
    name="dynshift",
    version="0.1.0",
    description="DPMD + DFT labels + SOAP/NN-NMR to dynamic 23Na shifts, as one MPI batch engine",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "jobs", "jobs.*", "schemas", "schemas.*"]),
    package_data={"jobs": ["data/*"], "schemas": ["*.yaml"]},
    install_requires=[
        "numpy", "pydantic>=2.5", "PyYAML", "mpi4py>=3.1", "h5py>=3.8", "ase>=3.23",
        "dscribe>=2.1", "numba", "deepmd-kit", "matplotlib", "nmrglue", "scipy",
    ],
    entry_points={"console_scripts": ["dynshift = engine.cli:main"]},
)
