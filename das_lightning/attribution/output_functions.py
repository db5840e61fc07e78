"""Output functions: the scalar f(eps_theta) that is differentiated to make a sample's feature (METHOD.md §2).

Each function takes the predicted and the true noise of ONE sample (any shape, no batch dimension) and returns
a 0-d tensor; it runs unchanged inside ``torch.func.vmap``. For a batch use :func:`batched_output`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from das_lightning.errors import ConfigError

OutputFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_output(eps_pred: torch.Tensor, eps_true: torch.Tensor) -> torch.Tensor:
    """The diffusion loss mean (eps_theta - eps)^2 (TRAK)."""
    return (eps_pred - eps_true).pow(2).mean()


def square_output(eps_pred: torch.Tensor, eps_true: torch.Tensor) -> torch.Tensor:
    """Mean squared predicted noise (D-TRAK); the true noise is unused."""
    return eps_pred.pow(2).mean()


def mean_output(eps_pred: torch.Tensor, eps_true: torch.Tensor) -> torch.Tensor:
    """Mean predicted noise (DAS's output compression)."""
    return eps_pred.mean()


def abs_mean_output(eps_pred: torch.Tensor, eps_true: torch.Tensor) -> torch.Tensor:
    """Mean absolute predicted noise (the L1 variant in the DAS authors' code history)."""
    return eps_pred.abs().mean()


def l2_output(eps_pred: torch.Tensor, eps_true: torch.Tensor) -> torch.Tensor:
    """L2 norm of the predicted noise."""
    return eps_pred.pow(2).sum().sqrt()


OUTPUT_FUNCTIONS: dict[str, OutputFunction] = {
    "loss": loss_output,
    "square": square_output,
    "mean": mean_output,
    "abs_mean": abs_mean_output,
    "l2": l2_output,
}


def get_output_function(name: str) -> OutputFunction:
    """The registered output function called ``name``; ValueError naming the known ones otherwise."""
    try:
        return OUTPUT_FUNCTIONS[name]
    except KeyError:
        raise ConfigError(f"unknown output function {name!r}; known: {sorted(OUTPUT_FUNCTIONS)}") from None


def batched_output(name: str, eps_pred: torch.Tensor, eps_true: torch.Tensor) -> torch.Tensor:
    """The output function applied to each row of a batch: (B, ...) x (B, ...) -> (B,)."""
    return torch.func.vmap(get_output_function(name))(eps_pred, eps_true)
