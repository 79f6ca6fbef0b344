"""STAR: separator-based autoregressive pretraining of Vision Mamba."""

__version__ = "0.1.0"
