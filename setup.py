"""Builds the package; the C++/CUDA extension elalora_kernels._C is added by the kernels."""
from setuptools import setup

setup()
