"""nbflash's version, as pyproject.toml gives it (for a checkout that is not installed)."""

__version__ = "0.1.0"
