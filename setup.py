# cffi_modules has no pyproject.toml spelling; everything else lives there.
from setuptools import setup

setup(cffi_modules=["native/build_engine.py:ffibuilder"])
