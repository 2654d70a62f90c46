"""qsim: a number-format simulator for transformers."""
__version__ = "0.1.0"
