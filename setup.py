# cffi_modules and the package-dir mapping have no pyproject.toml spelling;
# everything else lives there.
from setuptools import find_packages, setup

setup(
    cffi_modules=["native/build_engine.py:ffibuilder"],
    packages=find_packages(include=["kvtier", "kvtier.*"]) + ["kvtier_sglang"],
    package_dir={"kvtier_sglang": "integrations/sglang"},
)
