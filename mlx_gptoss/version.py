"""The package version: one place, read by pyproject (setuptools' ``attr:``) and by what writes it into files."""

__version__ = "0.1.0"
