"""Fine-tuning: a classification head on a backbone (frozen or fully trained) -> the teacher."""

from .finetune import FinetuneConfig, FinetuneResult, finetune
from .heads import attach_head, head_parameters

__all__ = ["FinetuneConfig", "FinetuneResult", "attach_head", "finetune", "head_parameters"]
