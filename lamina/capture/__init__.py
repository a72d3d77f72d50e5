"""Capture: stream every block's pooled output into a feature store."""

from .capture import CaptureConfig, CaptureResult, capture
from .hooks import POOLINGS, pool, recording

__all__ = ["capture", "CaptureConfig", "CaptureResult", "pool", "recording", "POOLINGS"]
