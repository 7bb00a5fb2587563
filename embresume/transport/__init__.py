"""Transports (data plane) and their selection."""

from .base import PeerPool, Transport

__all__ = ["PeerPool", "Transport"]
