# All metadata is in setup.cfg; this shim lets older tools (and `pip install -e .`) build the package.
from setuptools import setup

setup()
