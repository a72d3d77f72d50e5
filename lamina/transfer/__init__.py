"""Heads on a frozen backbone (last, best, mix, select, side) and the truncated model that serves them."""

from .transfer import HEADS, TransferConfig, TransferResult, transfer

__all__ = ["transfer", "TransferConfig", "TransferResult", "HEADS"]
