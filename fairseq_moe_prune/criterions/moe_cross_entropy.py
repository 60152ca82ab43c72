"""Label-smoothed cross-entropy plus the MoE load-balancing loss, as NLLB trains.

loss = cross-entropy + moe_gate_loss_wt * sample_size * (mean or sum of each MoE layer's l_aux)
"""


from dataclasses import dataclass, field

import torch
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum

from fairseq_moe_prune.moe.layer import MoELayer


@dataclass
class MoECrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    moe_gate_loss_wt: float = field(
        default=0.01, metadata={"help": "weight of the load-balancing loss (NLLB trained with 0.01)"}
    )
    moe_gate_loss_combine_method: ChoiceEnum(["average", "sum"]) = field(  # type: ignore
        default="average", metadata={"help": "how the MoE layers' losses are combined"}
    )


@register_criterion("moe_label_smoothed_cross_entropy", dataclass=MoECrossEntropyConfig)
class MoELabelSmoothedCrossEntropy(LabelSmoothedCrossEntropyCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        moe_gate_loss_wt,
        moe_gate_loss_combine_method,
        ignore_prefix_size=0,
        report_accuracy=False,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.gate_loss_weight = moe_gate_loss_wt
        self.gate_loss_combine_method = str(moe_gate_loss_combine_method)

    def gate_loss(self, model) -> torch.Tensor:
        """The l_aux that each MoE layer left from the forward pass just run, combined."""
        losses = [m.l_aux for m in model.modules() if isinstance(m, MoELayer) and m.l_aux is not None]
        if not losses:
            raise ValueError("moe_label_smoothed_cross_entropy needs a model with MoE layers")
        total = torch.stack([loss.float() for loss in losses]).sum()
        return total / len(losses) if self.gate_loss_combine_method == "average" else total

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        gate_loss = sample_size * self.gate_loss(model)
        loss = loss + self.gate_loss_weight * gate_loss.to(loss.dtype)
        logging_output["loss"] = loss.data
        logging_output["moe_gate_loss"] = gate_loss.data
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        gate_loss_sum = sum(log.get("moe_gate_loss", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("moe_gate_loss", gate_loss_sum / sample_size, sample_size, round=5)
