"""The package version: pyproject.toml reads it from here (``[tool.setuptools.dynamic]``), so the
installed metadata and ``fastadapt.__version__`` cannot disagree."""
__version__ = "0.1.0"
