"""Analyze: what every layer knows (probes, k-NN, geometry, CKA) and how much it matters (importance)."""

from .analyze import AnalyzeConfig, AnalyzeResult, analyze, layer_metrics
from .compare import CompareConfig, CompareResult, compare
from .importance import ImportanceResult, block_importance

__all__ = ["analyze", "AnalyzeConfig", "AnalyzeResult", "layer_metrics", "compare", "CompareConfig",
           "CompareResult", "block_importance", "ImportanceResult"]
