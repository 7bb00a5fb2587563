"""The encoder endpoint's argument checks: what ``send`` and ``send_tensors`` are given, checked at the call.

Bad arguments raise :class:`~embresume.errors.InvalidArgument` here, before
anything is registered with the room machine.
"""

from __future__ import annotations

import torch

from .config import Config
from .errors import ConfigError, InvalidArgument
from .source import TensorSource

_INT32 = (-(1 << 31), (1 << 31) - 1)


def check_delta(delta) -> None:
    """``mrope_delta`` is an int32 (aux carries it as one)."""
    if isinstance(delta, bool) or not isinstance(delta, int) or not _INT32[0] <= delta <= _INT32[1]:
        raise InvalidArgument(f"mrope_delta must be an int32, got {delta!r}")


def tensor_source(config: Config, embeddings, fill_ids, mrope_positions, mrope_delta) -> TensorSource:
    """``send_tensors``'s arguments checked against the Config, at the call
    (InvalidArgument); the shapes are read once, by TensorSource."""
    for name, t in (("embeddings", embeddings), ("fill_ids", fill_ids), ("mrope_positions", mrope_positions)):
        if not isinstance(t, torch.Tensor):
            raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__name__}"
                                  + (" (wrap it with torch.from_numpy)" if type(t).__module__ == "numpy" else ""))
    try:
        src = TensorSource(embeddings, fill_ids, mrope_positions, int(mrope_delta))
    except ConfigError as e:
        raise InvalidArgument(str(e)) from None
    if src.dtype != config.dtype:
        raise InvalidArgument(f"embeddings dtype is {src.dtype}, the Config's dtype is {config.dtype}")
    if src.hidden != config.hidden_size:
        raise InvalidArgument(f"embeddings width is {src.hidden}, the Config's hidden_size is {config.hidden_size}")
    return src
