"""How the report names, groups and orders the metrics it knows; unknown ones still show.

Accuracies (every ``*_acc``) share one axis; the probe's confidence bounds
become its band rather than lines of their own; every other per-layer metric
gets a small plot of its own, known ones first in a fixed order.
"""

from __future__ import annotations

# name: (label, short column title, reading hint or "")
KNOWN = {
    "probe_acc": ("Linear probe accuracy", "probe acc", "higher is better"),
    "knn_acc": ("k-NN accuracy", "k-NN acc", "higher is better"),
    "ncc_acc": ("Nearest-class-centre accuracy", "NCC acc", "higher is better"),
    "effective_rank": ("Effective rank", "eff. rank", "directions the features use"),
    "within_between_ratio": ("Within / between class variance", "within/between", "lower = more separable"),
    "cdnv": ("CDNV", "CDNV", "lower = more separable"),
    "cka_to_last": ("CKA to the last layer", "CKA to last", "1 = same representation"),
    "probe_C": ("Probe regularization C", "probe C", "chosen on validation"),
    "probe_ci_low": ("Probe accuracy, 95% CI low", "CI low", ""),
    "probe_ci_high": ("Probe accuracy, 95% CI high", "CI high", ""),
    "block_influence": ("Block Influence", "BI", "1 - cos(in, out); low = block changes little"),
    "skip_nmse": ("Skip nMSE", "skip nMSE", "output change when skipped; low = can go"),
    "skip_importance": ("Skip nMSE", "skip nMSE", "output change when skipped; low = can go"),
    "perplexity_change": ("Perplexity change when skipped", "ppl change", "lower is better: low = can go"),
    "skip_perplexity": ("Perplexity when skipped", "skip ppl", "lower is better: low = can go"),
    "angular_1": ("Angular distance (n = 1)", "angular n=1", "arccos(cos(in, out)) / pi; lower is better"),
    "angular": ("Angular distance", "angular", "arccos(cos(h_l, h_l+n)) / pi; lower = span can go"),
    "cka": ("Linear CKA", "CKA", ""),
}
BAND = ("probe_ci_low", "probe_ci_high")
ORDER = ("probe_acc", "knn_acc", "ncc_acc", "effective_rank", "within_between_ratio", "cdnv", "cka_to_last")
LOG_SCALE = ("probe_C",)  # a hyper-parameter from a log grid


def label(name: str) -> str:
    return KNOWN[name][0] if name in KNOWN else name.replace("_", " ").capitalize()


def column(name: str) -> str:
    return KNOWN[name][1] if name in KNOWN else name.replace("_", " ")


def hint(name: str) -> str:
    return KNOWN[name][2] if name in KNOWN else ""


def is_accuracy(name: str) -> bool:
    return name.endswith("_acc")


def ordered(names) -> list[str]:
    """Known metrics in their fixed order, then the others as the file lists them, ``probe_C`` last."""
    names = list(names)
    first = [n for n in ORDER if n in names]
    last = [n for n in LOG_SCALE if n in names]
    return first + [n for n in names if n not in first and n not in last] + last


def short_layer(name: str) -> str:
    """Tick label for a layer: ``blocks.12`` -> ``12``, ``embed`` -> ``emb``."""
    if name == "embed":
        return "emb"
    if name.startswith("blocks."):
        return name[len("blocks."):]
    return name
