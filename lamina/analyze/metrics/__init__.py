"""Per-layer metrics over feature matrices: numpy in, plain Python / numpy out.

Shapes: N samples, D features, L layers. Every function here is pure (no
model, no store, no I/O), so analyses and tests call them on any arrays.

- ``stratified_split``: the train/val/test split every analysis shares.
- ``probe_layers``: linear-probe accuracy for all layers and all C at once.
- ``knn_accuracy``: cosine k-NN accuracy, chunked.
- ``linear_cka``, ``cka_matrix``, ``MinibatchCKA``, ``streaming_cka``,
  ``cka_permutation_null``: representation similarity.
- ``effective_rank``, ``explained_variance``, ``components_for_variance``,
  ``separability``, ``ncc_accuracy``: geometry of one layer's features.
"""

from lamina.analyze.metrics.cka import (MinibatchCKA, cka_matrix, cka_permutation_null, linear_cka,
                                        streaming_cka)
from lamina.analyze.metrics.geometry import (components_for_variance, effective_rank, explained_variance,
                                             ncc_accuracy, separability, variance_spectrum)
from lamina.analyze.metrics.knn import knn_accuracy, knn_predict
from lamina.analyze.metrics.probe import DEFAULT_CS, ProbeResult, probe_layers, wilson_interval
from lamina.analyze.metrics.split import stratified_split

__all__ = [
    "DEFAULT_CS", "MinibatchCKA", "ProbeResult", "cka_matrix", "cka_permutation_null",
    "components_for_variance", "effective_rank", "explained_variance", "knn_accuracy", "knn_predict",
    "linear_cka", "ncc_accuracy", "probe_layers", "separability", "stratified_split", "streaming_cka",
    "variance_spectrum", "wilson_interval",
]
