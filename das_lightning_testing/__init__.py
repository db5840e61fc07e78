"""Fixtures for das-lightning's tests and benchmarks, kept out of the library: nothing in ``das_lightning`` imports
this package. ``tiny_sd``: a tiny random Stable Diffusion pipeline saved in the diffusers layout (offline)."""
