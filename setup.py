"""Build script: the Python package, the Triton kernels (kernels/ -> divco.kernels)
and the native extension divco._C (added with the kernels; see csrc/)."""

from setuptools import find_packages, setup

packages = find_packages(include=["divco", "divco.*"]) + ["divco.kernels"]

setup(
    packages=packages,
    package_dir={"divco.kernels": "kernels"},
)
