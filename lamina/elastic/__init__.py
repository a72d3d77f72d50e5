"""Elastic models: one training run, a nested family of sub-models (Nemotron Elastic, MatFormer, DynaBERT).

    order (importance, in place) -> train (sandwich rule + in-place distillation) -> select -> extract

``lamina.elastic(teacher, ElasticConfig(out="E", depths="6,4,3", widths="1,0.75,0.5"))`` writes E/model (the
ordered, trained parent) and E/elastic.json (grid, block order, every member's parameters, latency and
validation metric, the Pareto front, the training cost); ``lamina.elastic_extract("E", ExtractConfig(out="M",
depth=4, ffn=0.5))`` writes a real smaller model M/model without training.
"""

from .budget import Budget, Grid, make_grid
from .family import Family, keep_groups_
from .order import block_order, order_, permute_channels_, permute_ffn_, permute_groups_
from .train import ElasticConfig, ElasticResult, elastic, sandwich_loss
from .extract import ExtractConfig, ExtractResult, elastic_extract

__all__ = ["Budget", "ElasticConfig", "ElasticResult", "ExtractConfig", "ExtractResult", "Family", "Grid",
           "block_order", "elastic", "elastic_extract", "keep_groups_", "make_grid", "order_",
           "permute_channels_", "permute_ffn_", "permute_groups_", "sandwich_loss"]
