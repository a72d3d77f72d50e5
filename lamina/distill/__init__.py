"""Distillation: ``distill`` (:mod:`.distill`) trains a student (the compressed model) to match its teacher (the original).

Losses (:mod:`.losses`): task cross-entropy, Hinton KD on softened logits,
SKT intra-layer cosine and inter-layer FSP transfer through learned adapters,
and CFE's I²CL centre loss, combined by :func:`total_loss` under
:class:`LossWeights`. :func:`record` (:mod:`.taps`) collects the tapped layer
outputs of both models with autograd.

Example::

    from lamina.distill import LossWeights, make_adapters, record, total_loss
    taps = ["bert.encoder.layer.0", "bert.encoder.layer.1"]    # a BertForSequenceClassification
    with record(teacher, taps) as t_out, torch.no_grad():
        t_logits = teacher(**batch).logits
    with record(student, taps) as s_out:
        s_logits = student(**batch).logits
    t_feats, s_feats = [t_out[n] for n in taps], [s_out[n] for n in taps]
    adapters = make_adapters(s_feats, t_feats)        # once, then train them with the student
    loss, parts = total_loss(LossWeights(), student_logits=s_logits, teacher_logits=t_logits,
                             labels=batch["labels"], student_feats=s_feats, teacher_feats=t_feats,
                             adapters=adapters, masks=batch["attention_mask"])
    loss.backward()
"""

from .losses import (ADAPTER_KINDS, Adapter, CenterLoss, LossWeights, ce_loss, cosine_loss, fsp_loss, fsp_matrix,
                     kd_loss, make_adapters, total_loss)
from .taps import record
from .distill import DistillConfig, DistillResult, distill, layer_map, parse_layer_map

__all__ = ["DistillConfig", "DistillResult", "distill", "layer_map", "parse_layer_map", "ADAPTER_KINDS", "Adapter", "CenterLoss", "LossWeights", "ce_loss", "cosine_loss", "fsp_loss",
           "fsp_matrix", "kd_loss", "make_adapters", "record", "total_loss"]
