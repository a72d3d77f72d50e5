"""lamina: open a pretrained network layer by layer.

Measure what every layer knows and how much it matters, and turn that into a
smaller, faster model for your task, with measurements that prove it.

    import lamina
    res = lamina.capture("minilm", "rotten-tomatoes", lamina.CaptureConfig(out="run/", limit=500))
    store = lamina.FeatureStore.open("run/")
    lamina.analyze("run/", lamina.AnalyzeConfig())   # -> run/scores.json
    lamina.report("run/")                            # -> run/report.html
    lamina.finetune("minilm", "rotten-tomatoes", lamina.FinetuneConfig(out="teacher/", full=True))
    lamina.prune("teacher/", None, lamina.PruneConfig(out="small/", drop_blocks=0.5))  # scored on its own rows
    lamina.distill("teacher/", "small/", lamina.DistillConfig(out="recovered/"))
    lamina.bench(["teacher/", "recovered/"])        # -> recovered/bench.json
    lamina.transfer("run/", lamina.TransferConfig(head="mix"))  # -> run/transfer/mix, run/transfer.json
    lamina.quantize("teacher/", lamina.QuantizeConfig(out="q/", fraction=0.8))  # least sensitive Linears -> bf16 (or int8)
    lamina.elastic("teacher/", lamina.ElasticConfig(out="E/", depths="6,4", widths="1,0.5"))  # nested family
    lamina.elastic_extract("E/", lamina.ExtractConfig(out="half/", params=0.5))  # a member, no training
    model = lamina.load("small/")                    # any saved model, as an nn.Module (load_model: advanced)
"""

__version__ = "0.1.0"

from .blocks import BlockMap, Tap, find_blocks, select_taps  # noqa: E402
from .capture import CaptureConfig, CaptureResult, capture  # noqa: E402
# One public verb per stage at the top level, as `lamina.capture`: the verb
# names shadow their subpackages as attributes; import configs from here.
from .analyze import AnalyzeConfig, AnalyzeResult, CompareConfig, CompareResult, analyze, compare  # noqa: E402
from .report import ReportConfig, ReportResult, report  # noqa: E402
from .data import Dataset, load_data  # noqa: E402
from .errors import LaminaError, UsageError  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402
from .store import FeatureStore  # noqa: E402
from .finetune import FinetuneConfig, FinetuneResult, finetune  # noqa: E402
from .compress import PruneConfig, PruneResult, prune  # noqa: E402
from .distill import DistillConfig, DistillResult, distill  # noqa: E402
from .bench import BenchConfig, bench  # noqa: E402
from .transfer import TransferConfig, TransferResult, transfer  # noqa: E402
from .quantize import QuantizeConfig, QuantizeResult, quantize  # noqa: E402
from .elastic import ElasticConfig, ElasticResult, ExtractConfig, ExtractResult, elastic, elastic_extract  # noqa: E402,I001


def load(path, *, factory: str | None = None, trust_code: bool | None = None):
    """The ``nn.Module`` saved in ``path`` (a Hugging Face folder, lamina's format, or a stage's OUT folder).

    ``factory='module:fn'`` / ``trust_code=True``: allow rebuilding a folder whose lamina.json names that
    factory (lamina never imports code because a file says so; see lamina.trust)."""
    return load_model(path, factory=factory, trust_code=trust_code).module

__all__ = ["capture", "CaptureConfig", "CaptureResult", "analyze", "AnalyzeConfig", "AnalyzeResult", "compare",
           "CompareConfig", "CompareResult", "report", "ReportConfig", "ReportResult", "FeatureStore", "find_blocks", "select_taps",
           "BlockMap", "Tap", "load_model", "LoadedModel", "load_data", "Dataset", "LaminaError",
           "UsageError", "__version__", "finetune", "FinetuneConfig", "FinetuneResult", "prune", "PruneConfig",
           "PruneResult", "distill", "DistillConfig", "DistillResult", "bench", "BenchConfig", "load",
           "transfer", "TransferConfig", "TransferResult", "quantize", "QuantizeConfig",
           "QuantizeResult", "elastic", "ElasticConfig", "ElasticResult", "elastic_extract", "ExtractConfig",
           "ExtractResult"]
