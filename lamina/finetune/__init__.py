"""Fine-tuning: a classification head on a backbone (frozen or fully trained) -> the teacher."""

from .finetune import FinetuneConfig, FinetuneResult, check_out, finetune
from .heads import attach_head, head_parameters

__all__ = ["FinetuneConfig", "FinetuneResult", "attach_head", "check_out", "finetune", "head_parameters"]
