"""Label-smoothed cross-entropy plus the MoE load-balancing loss, as NLLB trains.

loss = cross-entropy + moe_gate_loss_wt * sample_size * (mean or sum of the MoE layers' l_aux)

The load-balancing losses are those the forward returned (``net_output[1]["l_aux"]``, one per MoE layer
that ran), as NLLB's criterion reads them; a layer that layerdrop skipped contributes nothing.
"""


from dataclasses import dataclass, field

import torch
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum


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

    def gate_loss(self, net_output) -> torch.Tensor:
        """The load-balancing losses that the forward returned, combined (0 when every MoE layer was skipped)."""
        extra = net_output[1]
        if "l_aux" not in extra:
            raise ValueError("moe_label_smoothed_cross_entropy needs a model whose forward returns MoE losses "
                             "(--arch moe_transformer)")
        losses = extra["l_aux"]
        if not losses:
            return torch.zeros(())
        total = torch.stack([loss.float() for loss in losses]).sum()
        return total / len(losses) if self.gate_loss_combine_method == "average" else total

    def forward(self, model, sample, reduce=True):
        """fairseq's label-smoothed cross-entropy (its forward, with the net output kept) plus the gate loss."""
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        gate_loss = sample_size * self.gate_loss(net_output).to(loss.device)
        loss = loss + self.gate_loss_weight * gate_loss.to(loss.dtype)
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            "moe_gate_loss": gate_loss.data,
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        gate_loss_sum = sum(log.get("moe_gate_loss", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("moe_gate_loss", gate_loss_sum / sample_size, sample_size, round=5)
