"""embresume: resumable transfer of variable-length multimodal embeddings
from an encoder process to a language-model process."""

from .config import Config
from .encoder import EncoderEndpoint
from .errors import (AllocatorError, BlockSizeMismatch, ConfigError, EmbResumeError, EmbResumeTimeout,
                     InvalidArgument, PeerError, ProtocolError, ResultReleased, TransferError, TransferFailed,
                     TransportUnavailable, UnknownRoom)
from .language import LanguageEndpoint
from .merge import EmbeddingResult
from .status import Status

__version__ = "0.1.0"

__all__ = [
    "Config", "EncoderEndpoint", "LanguageEndpoint", "EmbeddingResult", "Status",
    "EmbResumeError", "ConfigError", "ProtocolError", "AllocatorError", "BlockSizeMismatch",
    "TransferError", "TransferFailed", "PeerError", "InvalidArgument", "UnknownRoom", "EmbResumeTimeout",
    "ResultReleased", "TransportUnavailable",
]
