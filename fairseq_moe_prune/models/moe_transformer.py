"""The registered MoE encoder-decoder: fairseq's transformer with NLLB-200's MoE layers.

Config fields and state-dict keys are NLLB's (fairseq ``nllb`` branch); two fields are ours:
``encoder_moe_expert_counts`` / ``decoder_moe_expert_counts`` give each MoE layer its own number
of experts, so that a pruned checkpoint describes its own shape.
"""


from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
)
from fairseq.models.transformer.transformer_legacy import base_architecture

from fairseq_moe_prune.models.layout import moe_layers
from fairseq_moe_prune.models.transformer_layers import MoEDecoderLayer, MoEEncoderLayer
from fairseq_moe_prune.moe.layer import MoELayer


@dataclass
class MoEConfig(FairseqDataclass):
    """NLLB's MoE fields (defaults as in the nllb branch) plus per-layer expert counts."""

    moe_freq: int = field(default=0, metadata={"help": "every N-th layer is an MoE layer (0: none)"})
    encoder_moe_freq: int = field(default=0, metadata={"help": "MoE frequency in the encoder"})
    decoder_moe_freq: int = field(default=0, metadata={"help": "MoE frequency in the decoder"})
    moe_expert_count: int = field(default=0, metadata={"help": "experts in each MoE layer"})
    encoder_moe_expert_counts: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated experts per encoder MoE layer (overrides --moe-expert-count)"},
    )
    decoder_moe_expert_counts: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated experts per decoder MoE layer (overrides --moe-expert-count)"},
    )
    moe_gating_use_fp32: bool = field(default=False, metadata={"help": "softmax the gate in fp32"})
    moe_second_expert_policy: ChoiceEnum(["all", "sampling", "random"]) = field(  # type: ignore
        default="sampling", metadata={"help": "how the second expert is chosen"}
    )
    moe_normalize_gate_prob_before_dropping: bool = field(
        default=False, metadata={"help": "renormalise top-2 weights before capacity dropping"}
    )
    moe_eval_capacity_token_fraction: float = field(
        default=0.25, metadata={"help": "expert capacity at inference as a fraction of tokens"}
    )
    moe_batch_prioritized_routing: bool = field(
        default=False, metadata={"help": "confident tokens take capacity first"}
    )
    use_moe_pad_mask: bool = field(default=False, metadata={"help": "padding takes no expert slot"})
    moe_eom: float = field(default=0.0, metadata={"help": "expert output masking rate"})
    moe_top1_expert: bool = field(default=False, metadata={"help": "top-1 instead of top-2 gating"})


class MoETransformerEncoder(TransformerEncoderBase):
    def __init__(self, cfg: Any, dictionary, embed_tokens):
        super().__init__(cfg, dictionary, embed_tokens)
        for spec in moe_layers(cfg):
            if spec.side == "encoder":
                self.layers[spec.layer] = MoEEncoderLayer(cfg, spec.num_experts)


class MoETransformerDecoder(TransformerDecoderBase):
    def __init__(self, cfg: Any, dictionary, embed_tokens, no_encoder_attn: bool = False):
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        for spec in moe_layers(cfg):
            if spec.side == "decoder":
                self.layers[spec.layer] = MoEDecoderLayer(cfg, spec.num_experts, no_encoder_attn)


@register_model("moe_transformer")
class MoETransformerModel(TransformerModel):
    """fairseq's transformer whose every ``moe_freq``-th layer is an NLLB MoE layer."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, MoEConfig(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        moe_base_architecture(args)
        moe_layers(args)  # fail early, with a clear message, on inconsistent MoE fields
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return MoETransformerEncoder(TransformerConfig.from_namespace(cfg), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(cfg)
        return MoETransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)

    def moe_layers(self) -> List[MoELayer]:
        """The MoE blocks in layout order (encoder first)."""
        return [m for m in self.modules() if isinstance(m, MoELayer)]


def _set_defaults(args: Any, **values: Any) -> None:
    """Fill in what the command line left unset (fairseq's architecture-function convention)."""
    for name, value in values.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


@register_model_architecture("moe_transformer", "moe_transformer")
def moe_base_architecture(args):
    defaults = MoEConfig()
    _set_defaults(args, **{f.name: getattr(defaults, f.name) for f in fields(MoEConfig) if not f.name.startswith("_")})
    base_architecture(args)


@register_model_architecture("moe_transformer", "moe_transformer_tiny")
def moe_transformer_tiny(args):
    """For tests: 2+2 layers of width 32, 4 experts in layers 1 of encoder and decoder."""
    _set_defaults(
        args,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_layers=2,
        encoder_attention_heads=2,
        decoder_layers=2,
        decoder_attention_heads=2,
        moe_freq=2,
        moe_expert_count=4,
        moe_gating_use_fp32=True,
        moe_second_expert_policy="all",
        moe_eval_capacity_token_fraction=1.0,
    )
    moe_base_architecture(args)


@register_model_architecture("moe_transformer", "transformer_24_24_big")
def nllb_moe_54b(args):
    """NLLB-200 MoE 54.5B: 24+24 pre-norm layers, 2048/8192, 128 experts every 4th layer."""
    _set_defaults(
        args,
        encoder_embed_dim=2048,
        encoder_ffn_embed_dim=8192,
        encoder_layers=24,
        encoder_attention_heads=16,
        encoder_normalize_before=True,
        decoder_layers=24,
        decoder_attention_heads=16,
        decoder_normalize_before=True,
        share_all_embeddings=True,
        dropout=0.1,
        attention_dropout=0.1,
        moe_freq=4,
        moe_expert_count=128,
        moe_gating_use_fp32=True,
        moe_second_expert_policy="all",
        moe_normalize_gate_prob_before_dropping=False,
        moe_eval_capacity_token_fraction=1.0,
        use_moe_pad_mask=False,
        moe_eom=0.2,
    )
    moe_base_architecture(args)
