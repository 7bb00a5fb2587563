"""embresume: resumable transfer of variable-length multimodal embeddings
from an encoder process to a language-model process.

The names below are imported on first use (PEP 562), so ``import embresume``
and the ``embresume`` command start without importing torch; ``from embresume
import Config`` works as usual."""

import importlib

from .errors import (AllocatorError, BindFailed, BlockSizeMismatch, ConfigError, EmbResumeError, EmbResumeTimeout,
                     FailCode, InvalidArgument, NoMemory, NotPublished, PeerError, ProtocolError, ResultReleased,
                     RoomBusy, RoomInUse, TransferError, TransferFailed, TransportUnavailable, UnknownRoom)
from .status import Status


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one source."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("embresume")
    except PackageNotFoundError:     # imported from a checkout that was never installed
        return "0+unknown"


__version__ = _version()

#: public name -> the module that defines it (imported when the name is first used)
_LAZY = {"Config": ".config", "EncoderEndpoint": ".encoder", "LanguageEndpoint": ".language",
         "EmbeddingResult": ".merge"}

__all__ = [
    "Config", "EncoderEndpoint", "LanguageEndpoint", "EmbeddingResult", "Status",
    "EmbResumeError", "ConfigError", "ProtocolError", "AllocatorError", "BlockSizeMismatch",
    "TransferError", "TransferFailed", "PeerError", "InvalidArgument", "UnknownRoom", "EmbResumeTimeout",
    "ResultReleased", "TransportUnavailable", "RoomBusy", "NotPublished", "RoomInUse", "NoMemory", "BindFailed",
    "FailCode",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):            # a submodule: embresume.metrics, embresume.harness, ...
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
