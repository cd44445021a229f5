"""ckptsync: keep training checkpoints safe when the GPU server goes away."""

__version__ = "0.1.0"
