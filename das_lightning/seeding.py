"""The one seed function: every seed in the project (subsets, training runs, timestep noise, projectors)
is derived here from a tuple of readable keys, so two stages that name the same keys get the same seed."""

from __future__ import annotations

import hashlib

import torch

_MASK63 = (1 << 63) - 1


def derive_seed(*keys: object) -> int:
    """A 63-bit seed from an ordered tuple of keys (str, int, float, bool or None).

    Stable across processes, machines and Python versions (no use of ``hash()``), and distinct for
    distinct key tuples with overwhelming probability, e.g. ``derive_seed("noise", "train", 17, 250, 0)``.
    """
    text = "\x1f".join(f"{type(key).__name__}:{key}" for key in keys)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def generator_for(*keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded by :func:`derive_seed` of ``keys``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*keys))
    return generator
