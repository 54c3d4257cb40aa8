"""Domain-adaptive language-model factory."""

__version__ = "0.1.0"
