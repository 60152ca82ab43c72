"""The registered MoE encoder-decoder: fairseq's transformer with NLLB-200's MoE layers.

Config fields and state-dict keys are NLLB's (fairseq ``nllb`` branch); some fields are ours:
``encoder_moe_expert_counts`` / ``decoder_moe_expert_counts`` give each MoE layer its own number
of experts, so that a pruned checkpoint describes its own shape; ``encoder_ffn_dims`` /
``decoder_ffn_dims`` give each dense layer its own FFN width (extracted sub-networks); the
``moe_task*`` fields route by task instead of by token (task-level MoE, ``task_routing.py``), with a
learned task embedding per side (``encoder.moe_task_embed``, ``decoder.moe_task_embed``).
"""


import copy
import math
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

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

from fairseq_moe_prune.models import task_routing
from fairseq_moe_prune.layout import MOE_CONFIG_FIELDS, MoEConfigError, config_value, moe_layers, skip_betas
from fairseq_moe_prune.models.task_routing import TaskLookup, TaskSpace
from fairseq_moe_prune.models.transformer_layers import MoEDecoderLayer, MoEEncoderLayer
from fairseq_moe_prune.moe.gate import SECOND_EXPERT_POLICIES, GateOptions
from fairseq_moe_prune.moe.layer import MoELayer
from fairseq_moe_prune.moe.placement import check_placement


@dataclass
class MoEConfig(FairseqDataclass):
    """NLLB's MoE fields plus ours (per-layer expert counts, FFN widths, task routing, placement); the
    gating fields' defaults are GateOptions's (the nllb branch's). Their names, in this order, are
    ``layout.MOE_CONFIG_FIELDS``, which readers of checkpoints use without importing the model."""

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
    moe_gating_use_fp32: bool = field(default=GateOptions.use_fp32, metadata={"help": "softmax the gate in fp32"})
    moe_second_expert_policy: ChoiceEnum(list(SECOND_EXPERT_POLICIES)) = field(  # type: ignore
        default=GateOptions.second_expert_policy, metadata={"help": "how the second expert is chosen"}
    )
    moe_normalize_gate_prob_before_dropping: bool = field(
        default=GateOptions.normalize_gate_prob_before_dropping,
        metadata={"help": "renormalise top-2 weights before capacity dropping"},
    )
    moe_eval_capacity_token_fraction: float = field(
        default=GateOptions.eval_capacity_token_fraction,
        metadata={"help": "expert capacity at inference as a fraction of tokens"},
    )
    moe_batch_prioritized_routing: bool = field(
        default=GateOptions.batch_prioritized_routing, metadata={"help": "confident tokens take capacity first"}
    )
    use_moe_pad_mask: bool = field(default=GateOptions.use_pad_mask, metadata={"help": "padding takes no expert slot"})
    moe_eom: float = field(default=0.0, metadata={"help": "expert output masking rate"})
    moe_top1_expert: bool = field(default=GateOptions.top1, metadata={"help": "top-1 instead of top-2 gating"})
    moe_skip_betas: Optional[str] = field(
        default=None,
        metadata={"help": "dynamic skipping: comma-separated beta per MoE layer (encoder first); a token's second "
                          "expert is skipped when its gate value is below beta times the first's (empty: off)"},
    )
    encoder_ffn_dims: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated FFN width of each encoder layer (dense layers; default: "
                          "--encoder-ffn-embed-dim everywhere); extract writes it for folded sub-networks"},
    )
    decoder_ffn_dims: Optional[str] = field(
        default=None, metadata={"help": "comma-separated FFN width of each decoder layer (as --encoder-ffn-dims)"}
    )
    moe_task_routing: ChoiceEnum(list(task_routing.TASK_ROUTING)) = field(  # type: ignore
        default="none",
        metadata={"help": "route by task instead of by token (task-level MoE): in no layer, in the decoder's "
                          "MoE layers, or in both sides' (the encoder's by source language)"},
    )
    moe_task: ChoiceEnum(list(task_routing.TASKS)) = field(  # type: ignore
        default="target", metadata={"help": "the decoder's task: the target language or the language pair"}
    )
    moe_task_langs: Optional[str] = field(
        default=None, metadata={"help": "task routing: the languages, in task-id order (default: --langs)"}
    )
    moe_task_pairs: Optional[str] = field(
        default=None, metadata={"help": "task routing: the trained pairs, in task-id order (default: --lang-pairs)"}
    )
    moe_expert_offload: bool = field(
        default=False,
        metadata={"help": "keep every expert in host memory and copy to the device only the experts a batch "
                          "routes to (inference)"},
    )
    moe_offload_cache_experts: int = field(
        default=8, metadata={"help": "with --moe-expert-offload: experts kept on the device per MoE layer (LRU, >= 2)"}
    )
    moe_expert_devices: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated devices (e.g. cuda:0,cuda:1) over which each MoE layer's experts are "
                          "split evenly; list the device that holds the rest of the model first"},
    )


FIELD_RANGES = {"moe_eom": (0.0, 1.0)}  # closed ranges of our float fields beyond "finite"; ints are >= 0


def expected_value(kind: Any, name: str, value: Any) -> Optional[str]:
    """What a value of a field of type ``kind`` must be, when ``value`` is not that (None: it is)."""
    if kind is bool:
        return None if isinstance(value, bool) else "true or false (a bool, not a string)"
    if kind is int:
        return None if type(value) is int and value >= 0 else "a whole number >= 0"
    if kind is float:
        low, high = FIELD_RANGES.get(name, (-math.inf, math.inf))
        fine = type(value) in (int, float) and math.isfinite(value) and low <= value <= high
        return None if fine else "a finite number" + (f" in [{low:g}, {high:g}]" if name in FIELD_RANGES else "")
    if isinstance(kind, type) and issubclass(kind, Enum):
        choices = [choice.value for choice in kind]
        return None if (value.value if isinstance(value, Enum) else value) in choices else f"one of {', '.join(choices)}"
    return None if isinstance(value, str) else "a string"  # Optional[str]


def check_field_types(cfg: Any) -> None:
    """Every MoEConfig field of ``cfg`` has its declared type: a bool is a bool (``'False'`` is not: a
    non-empty string is true), an int an int, a float a finite number (in its range), a string a string, a
    choice one of its choices; None leaves the default. Values come from checkpoints and
    ``--model-overrides`` as well as from the parser, so they are checked where the model is built."""
    for spec in fields(MoEConfig):
        value = cfg.get(spec.name) if isinstance(cfg, dict) else getattr(cfg, spec.name, None)
        expected = None if value is None else expected_value(spec.type, spec.name, value)
        if expected is not None:
            raise MoEConfigError(f"{spec.name} must be {expected}, got {repr(value)[:40]}")


def task_embedding(cfg: Any, side: str, embed_dim: int) -> Optional[nn.Embedding]:
    """The learned task embedding a task-routed side's gates see (None where the side routes by token)."""
    if not task_routing.routes_by_task(cfg, side) or not any(spec.side == side for spec in moe_layers(cfg)):
        return None
    return nn.Embedding(TaskSpace.from_config(cfg).num_tasks(side), embed_dim)


def ffn_dims(cfg: Any, side: str) -> List[int]:
    """The FFN width of each of the side's layers (``{side}_ffn_dims``, else the side's one width)."""
    text = config_value(cfg, f"{side}_ffn_dims")
    num_layers = getattr(cfg, side).layers
    if not text:
        return [getattr(cfg, side).ffn_embed_dim] * num_layers
    try:
        dims = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise MoEConfigError(f"{side}_ffn_dims must be comma-separated integers, got {text!r}") from None
    if len(dims) != num_layers or min(dims) < 1:
        raise MoEConfigError(f"{side}_ffn_dims needs one positive width per {side} layer ({num_layers}), got {text!r}")
    return dims


def with_ffn_dim(cfg: Any, side: str, width: int) -> Any:
    """A copy of the config whose ``side`` FFNs have ``width`` units."""
    cfg = copy.deepcopy(cfg)
    getattr(cfg, side).ffn_embed_dim = width
    return cfg


class MoETransformerEncoder(TransformerEncoderBase):
    def __init__(self, cfg: Any, dictionary, embed_tokens):
        super().__init__(cfg, dictionary, embed_tokens)
        for i, width in enumerate(ffn_dims(cfg, "encoder")):
            if width != cfg.encoder.ffn_embed_dim:
                self.layers[i] = self.build_encoder_layer(with_ffn_dim(cfg, "encoder", width))
        for spec, beta in zip(moe_layers(cfg), skip_betas(cfg)):
            if spec.side == "encoder":
                self.layers[spec.layer] = MoEEncoderLayer(cfg, spec.num_experts, beta)
        self.moe_task_embed = task_embedding(cfg, "encoder", cfg.encoder.embed_dim)
        # the source language is needed by a task-routed encoder, and by a decoder that routes by pair
        needs_source = self.moe_task_embed is not None or (
            task_routing.routes_by_task(cfg, "decoder") and TaskSpace.from_config(cfg).task == "pair")
        self.task_lookup = TaskLookup(TaskSpace.from_config(cfg), dictionary) if needs_source else None

    def forward_scriptable(self, src_tokens, src_lengths: Optional[Tensor] = None, return_all_hiddens: bool = False,
                           token_embeddings: Optional[Tensor] = None):
        """fairseq's encoder forward, whose output also carries ``l_aux``: the load-balancing loss of each
        MoE layer that ran (layerdrop may skip some), in layer order. With task routing the MoE layers
        get each sentence's task embedding, and the output carries the source languages for a decoder
        that routes by pair."""
        source_langs = self.task_lookup.source_langs(src_tokens) if self.task_lookup is not None else None
        task_states = self.moe_task_embed(source_langs) if self.moe_task_embed is not None else None
        encoder_padding_mask = src_tokens.eq(self.padding_idx)
        has_pads = bool(encoder_padding_mask.any())
        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)
        if has_pads:
            x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)  # B x T x C -> T x B x C
        layer_mask = encoder_padding_mask if has_pads else None
        encoder_states = [x] if return_all_hiddens else []
        fc_results: List[Optional[Tensor]] = []
        l_aux: List[Tensor] = []
        for layer in self.layers:
            if isinstance(layer, MoEEncoderLayer):
                x, layer_l_aux = layer(x, layer_mask, task_states=task_states)
                l_aux.append(layer_l_aux)
            else:
                x = layer(x, encoder_padding_mask=layer_mask)
            if return_all_hiddens:
                encoder_states.append(x)
                fc_results.append(None)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        src_lengths = src_tokens.ne(self.padding_idx).sum(dim=1, dtype=torch.int32).reshape(-1, 1).contiguous()
        return {
            "encoder_out": [x],
            "encoder_padding_mask": [encoder_padding_mask],
            "encoder_embedding": [encoder_embedding],
            "encoder_states": encoder_states,
            "fc_results": fc_results,
            "src_tokens": [],
            "src_lengths": [src_lengths],
            "moe_source_langs": [source_langs] if source_langs is not None else [],
            "l_aux": l_aux,
        }

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order):
        reordered = super().reorder_encoder_out(encoder_out, new_order)
        if encoder_out.get("moe_source_langs"):
            reordered["moe_source_langs"] = [encoder_out["moe_source_langs"][0].index_select(0, new_order)]
        return reordered


class MoETransformerDecoder(TransformerDecoderBase):
    def __init__(self, cfg: Any, dictionary, embed_tokens, no_encoder_attn: bool = False):
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        for i, width in enumerate(ffn_dims(cfg, "decoder")):
            if width != cfg.decoder.ffn_embed_dim:
                self.layers[i] = self.build_decoder_layer(with_ffn_dim(cfg, "decoder", width), no_encoder_attn)
        for spec, beta in zip(moe_layers(cfg), skip_betas(cfg)):
            if spec.side == "decoder":
                self.layers[spec.layer] = MoEDecoderLayer(cfg, spec.num_experts, no_encoder_attn, beta)
        self.moe_task_embed = task_embedding(cfg, "decoder", cfg.decoder.embed_dim)
        self.task_lookup = TaskLookup(TaskSpace.from_config(cfg), dictionary) if self.moe_task_embed is not None else None

    def extract_features_scriptable(self, prev_output_tokens, encoder_out: Optional[Dict[str, List[Tensor]]],
                                    incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                                    full_context_alignment: bool = False, alignment_layer: Optional[int] = None,
                                    alignment_heads: Optional[int] = None, last_layer: Optional[int] = None):
        """fairseq's decoder forward, whose extra output also carries ``l_aux``: the encoder's list
        followed by the load-balancing loss of each decoder MoE layer that ran. With task routing the MoE
        layers get each sentence's task embedding, read from the first input token, which fairseq's
        generator passes at every step.

        ``last_layer``: stop after that layer and return its output (no final layer norm): the recording
        hook's pass over the decoder needs nothing after the last MoE layer."""
        task_states = None
        if self.task_lookup is not None:
            source_langs = (encoder_out["moe_source_langs"][0]
                            if encoder_out is not None and encoder_out.get("moe_source_langs") else None)
            task_states = self.moe_task_embed(self.task_lookup.decoder_tasks(prev_output_tokens, source_langs))
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1
        enc = encoder_out["encoder_out"][0] if encoder_out is not None and encoder_out["encoder_out"] else None
        padding_mask = (encoder_out["encoder_padding_mask"][0]
                        if encoder_out is not None and encoder_out["encoder_padding_mask"] else None)
        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        prev_output_tokens = prev_output_tokens.contiguous()
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x += positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x)
        x = x.transpose(0, 1)  # B x T x C -> T x B x C
        self_attn_padding_mask: Optional[Tensor] = None
        if self.cross_self_attention or prev_output_tokens.eq(self.padding_idx).any():
            self_attn_padding_mask = prev_output_tokens.eq(self.padding_idx)

        attn: Optional[Tensor] = None
        inner_states: List[Optional[Tensor]] = [x]
        l_aux: List[Tensor] = list(encoder_out["l_aux"]) if encoder_out is not None and "l_aux" in encoder_out else []
        for idx, layer in enumerate(self.layers):
            self_attn_mask = self.buffered_future_mask(x) if incremental_state is None and not full_context_alignment else None
            if isinstance(layer, MoEDecoderLayer):
                x, layer_attn, _, layer_l_aux = layer(x, enc, padding_mask, incremental_state,
                                                      self_attn_mask=self_attn_mask,
                                                      self_attn_padding_mask=self_attn_padding_mask,
                                                      need_attn=bool(idx == alignment_layer),
                                                      need_head_weights=bool(idx == alignment_layer),
                                                      task_states=task_states)
                l_aux.append(layer_l_aux)
            else:
                x, layer_attn, _ = layer(x, enc, padding_mask, incremental_state, self_attn_mask=self_attn_mask,
                                         self_attn_padding_mask=self_attn_padding_mask,
                                         need_attn=bool(idx == alignment_layer),
                                         need_head_weights=bool(idx == alignment_layer))
            inner_states.append(x)
            if idx == last_layer:
                return x.transpose(0, 1), {"attn": [None], "inner_states": inner_states, "l_aux": l_aux}
            if layer_attn is not None and idx == alignment_layer:
                attn = layer_attn.float().to(x)
        if attn is not None:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]
            attn = attn.mean(dim=0)  # average probabilities over heads
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)  # T x B x C -> B x T x C
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x, {"attn": [attn], "inner_states": inner_states, "l_aux": l_aux}


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
        check_field_types(args)  # before any field is used: --model-overrides and checkpoints are input too
        check_placement(args, moe_layers(args))
        skip_betas(args)  # fail early, with a clear message, on inconsistent MoE fields (and skipping betas)
        task_routing.configure(args, task)
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
    _set_defaults(args, **{name: getattr(defaults, name) for name in MOE_CONFIG_FIELDS})
    base_architecture(args)


@register_model_architecture("moe_transformer", "moe_transformer_toy")
def moe_transformer_toy(args):
    """A toy size, to try the plugin in seconds (README) and for the tests: 2+2 layers of width 32, 4 experts
    in layers 1 of encoder and decoder."""
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
