"""The fitness backends of NAMM training that run the PyTorch runtime: ``task`` and ``agreement``."""
