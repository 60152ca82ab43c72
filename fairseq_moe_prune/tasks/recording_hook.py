"""The generation hook shared by our translation tasks: ``--moe-stats-out`` records gate decisions.

``--moe-calibration-out`` samples the same tokens' MoE inputs and outputs (see ``calibration.py``).

During ``inference_step`` the encoder's MoE layers are recorded as the generator runs them (real
source tokens only). The decoder is recorded afterwards in one teacher-forced pass over each
sentence's final hypothesis, so pruned, finished-early and padded beams never count; with
``--moe-stats-decoder reference`` the pass runs over the reference targets instead. The pass reuses the
encoder output the generator computed (kept by :class:`EncoderKeepingEnsemble`) and stops after the
decoder's last MoE layer.

Why a pass and not the generator's own decoding steps: the counts are defined as those of a whole-sentence
forward (the tests recount them from one), and an incremental step computes the same gate logits only up to
the last float bits (1e-7 here), which moves probability sums kept at 2**32 resolution.
"""

import inspect
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from fairseq.data import data_utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.sequence_generator import EnsembleModel
from torch import Tensor

from fairseq_moe_prune import calibration, stats
from fairseq_moe_prune.files import WrittenAtExit, exit_on_sigterm  # noqa: F401 (exit_on_sigterm: also ours)
from fairseq_moe_prune.models.moe_transformer import MoETransformerDecoder
from fairseq_moe_prune.recording import Recorder

logger = logging.getLogger(__name__)


@dataclass
class GateRecordingConfig(FairseqDataclass):
    moe_stats_out: Optional[str] = field(
        default=None, metadata={"help": "record the MoE gates' decisions into this statistics file"}
    )
    moe_stats_decoder: ChoiceEnum(["hypothesis", "reference"]) = field(  # type: ignore
        default="hypothesis",
        metadata={"help": "decoder tokens to count: the final hypotheses or the reference targets"},
    )
    moe_stats_flush_seconds: float = field(
        default=60.0, metadata={"help": "rewrite the statistics file at most this often during a run"}
    )
    moe_calibration_out: Optional[str] = field(
        default=None,
        metadata={"help": "keep a sample of the MoE layers' inputs, gate softmax and outputs in this folder "
                          "(for --metric reconstruction and --skip-beta)"},
    )
    moe_calibration_tokens: int = field(
        default=2048, metadata={"help": "tokens sampled per MoE layer and language pair"}
    )


class StatsWriter(WrittenAtExit):
    """Writes the recorder's committed counts now and then, and once more when the process ends.

    The file lists the run (an identity and the size of the subset it was given), so that
    ``stats show`` can tell how much of the subset was counted and ``stats merge`` refuses it twice.
    """

    option = "--moe-stats-out"

    def __init__(self, recorder: Recorder, path: str, every_seconds: float, subset: Optional[str] = None,
                 subset_sentences: int = 0):
        if os.path.isdir(path):
            raise SystemExit(f"error: --moe-stats-out {path} is a folder; name the statistics file to write")
        if os.path.exists(path) and not stats.is_stats_file(path):
            raise SystemExit(f"error: --moe-stats-out {path} exists and is not a statistics file (refusing to replace it)")
        self.recorder, self.path, self.every_seconds = recorder, path, every_seconds
        self.subset, self.subset_sentences = subset, subset_sentences
        self.last_write = time.monotonic()
        # written now, at exit (SIGTERM included) and on close(), so that a task that builds a second
        # generator leaves no stale writer behind
        self.open()

    def write(self) -> None:
        recorded = self.recorder.snapshot()
        if self.subset is not None:
            recorded = stats.identify_runs(recorded, self.subset, self.subset_sentences)
        stats.save(recorded, self.path)
        self.last_write = time.monotonic()

    def maybe_write(self) -> None:
        if time.monotonic() - self.last_write >= self.every_seconds:
            self.write_checked()


class EncoderKeepingEnsemble(EnsembleModel):
    """fairseq's ensemble wrapper, keeping what the encoder returned for the batch being generated, so that
    the decoder pass after generation needs no second encoder run. The task puts it in the generator it
    builds (:meth:`GateRecordingMixin.build_generator`)."""

    def __init__(self, models):
        super().__init__(models)
        self.encoder_outs: Optional[List[Any]] = None

    def forward_encoder(self, net_input: Dict[str, Tensor]):
        self.encoder_outs = super().forward_encoder(net_input)
        return self.encoder_outs


class GateRecordingMixin:
    """Mixed into a fairseq translation task before the task class."""

    recorder: Optional[Recorder] = None
    stats_writer: Optional[StatsWriter] = None
    calibration_writer: Optional[calibration.CalibrationWriter] = None
    recording_subset: Optional[str] = None  # the subset being translated, and its sentences (this shard's)
    recording_subset_sentences: int = 0

    def _recording_option(self, name: str) -> Any:
        config = getattr(self, "args", None) or self.cfg
        return getattr(config, name, None)

    def recording_pair(self) -> str:
        """The direction being translated, e.g. ``eng_Latn-deu_Latn``."""
        source = self._recording_option("source_lang")
        target = self._recording_option("target_lang")
        if not source or not target:
            raise SystemExit("error: --moe-stats-out needs --source-lang and --target-lang")
        pair = f"{source}-{target}"
        try:  # the rule every file that names a pair is read with: refused now, not when the file is read
            stats.split_pair(pair)
        except stats.StatsError as error:
            raise SystemExit(f"error: --source-lang/--target-lang: {error}") from None
        return pair

    def decoder_bos(self) -> int:
        """The token the decoder starts from (fairseq's translation tasks start from EOS)."""
        return self.target_dictionary.eos()

    def build_generator(self, models, args, **kwargs):
        path = self._recording_option("moe_stats_out")
        calibration_out = self._recording_option("moe_calibration_out")
        generator = super().build_generator(models, args, **kwargs)
        if (path or calibration_out) and type(getattr(generator, "model", None)) is EnsembleModel:
            # fairseq's beam search over our ensemble, which keeps the encoder output for the decoder pass;
            # put in after the build since translation_multi_simple_epoch drops a seq_gen_cls it is given.
            # Other generators (--print-alignment's) keep theirs, and the pass runs the encoder again.
            generator.model = EncoderKeepingEnsemble(list(generator.model.models)).eval()
        self.close_recording()  # a generator built before this one stops writing
        if path or calibration_out:
            if len(models) != 1:
                raise SystemExit("error: --moe-stats-out records one model; pass a single --path")
            model = models[0]
            pair = self.recording_pair()  # before any file is written
            settings = {
                "decoder_tokens": str(self._recording_option("moe_stats_decoder")),
                "beam": int(getattr(generator, "beam_size", 1)),
                "eval_capacity_token_fraction": float(getattr(model.args, "moe_eval_capacity_token_fraction", 0)),
            }
            try:
                self.recorder = Recorder(model, settings)
            except ValueError as error:  # no MoE layers, inconsistent MoE fields
                raise SystemExit(f"error: --moe-stats-out: {error}") from None
            if path:
                self.stats_writer = StatsWriter(self.recorder, path, float(self._recording_option("moe_stats_flush_seconds")),
                                                self.recording_subset, self.recording_subset_sentences)
                logger.info(f"recording MoE gate decisions of {len(self.recorder.specs)} layers into {path}")
            if calibration_out:  # calibration samples of the same tokens (fairseq_moe_prune.calibration)
                seed = self._recording_option("seed")  # --seed: in the legacy tasks' args, else torch was seeded with it
                self.calibration_writer = calibration.attach(
                    self.recorder, calibration_out, int(self._recording_option("moe_calibration_tokens")),
                    int(torch.initial_seed() if seed is None else seed), pair)
                logger.info(f"sampling MoE layer inputs and outputs into {calibration_out}")
        return generator

    def close_recording(self) -> None:
        """Write the files of the current recording a last time and stop writing them at exit."""
        if self.stats_writer is not None:
            self.stats_writer.close()
        if self.calibration_writer is not None:
            self.calibration_writer.close()
        self.recorder, self.stats_writer, self.calibration_writer = None, None, None

    def get_batch_iterator(self, dataset, *args, **kwargs):
        """When recording, every sentence counts: fairseq's batching drops a last partial batch when
        ``--required-batch-size-multiple`` is above 1, so it is 1 whatever the flags say."""
        if not (self._recording_option("moe_stats_out") or self._recording_option("moe_calibration_out")):
            return super().get_batch_iterator(dataset, *args, **kwargs)
        call = inspect.signature(super().get_batch_iterator).bind(dataset, *args, **kwargs)
        call.arguments["required_batch_size_multiple"] = 1
        iterator = super().get_batch_iterator(*call.args, **call.kwargs)
        num_shards, shard_id = call.arguments.get("num_shards", 1), call.arguments.get("shard_id", 0)
        sentences = len(dataset)
        if num_shards > 1:
            sentences = sum(len(batch) for batch in iterator.frozen_batches[shard_id::num_shards])
        named = [name for name, known in self.datasets.items() if known is dataset]
        if named:
            self.recording_subset, self.recording_subset_sentences = named[0], sentences
        else:  # fairseq-interactive: one dataset per chunk of input
            self.recording_subset = "input"
            self.recording_subset_sentences += sentences
        self.recording_subset = re.sub(r"[^A-Za-z0-9_.-]", "_", self.recording_subset)[:64]
        if self.stats_writer is not None:
            self.stats_writer.subset, self.stats_writer.subset_sentences = self.recording_subset, self.recording_subset_sentences
        return iterator

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        if self.recorder is None:
            return super().inference_step(generator, models, sample, prefix_tokens, constraints)
        model = models[0]
        try:
            with self.recorder.recording("encoder"):
                hypos = super().inference_step(generator, models, sample, prefix_tokens, constraints)
            with torch.no_grad(), self.recorder.recording("decoder"):
                self.decoder_pass(model, self.decoder_inputs(sample, hypos), self.encoder_out(generator, model, sample))
        except BaseException:
            self.recorder.discard()
            raise
        self.recorder.commit(self.recording_pair(), int(sample["id"].numel()))
        if self.stats_writer is not None:
            self.stats_writer.maybe_write()
        return hypos

    def decoder_pass(self, model, decoder_inputs: Tensor, encoder_out: Dict[str, List[Tensor]]) -> None:
        """Teacher-force ``decoder_inputs`` through the decoder, up to its last MoE layer only: the layers
        above it and the output projection decide nothing that is recorded."""
        last = max((spec.layer for spec in self.recorder.specs if spec.side == "decoder"), default=None)
        if last is None:
            return
        if isinstance(model.decoder, MoETransformerDecoder):
            model.decoder.extract_features_scriptable(decoder_inputs, encoder_out, last_layer=last)
        else:
            model.decoder(decoder_inputs, encoder_out=encoder_out, features_only=True)

    @staticmethod
    def encoder_out(generator, model, sample) -> Dict[str, List[Tensor]]:
        """The encoder output of the batch just generated: kept by our generator's ensemble, or (with a
        generator of another class, e.g. fairseq's for --print-alignment) computed again."""
        ensemble = getattr(generator, "model", None)
        if isinstance(ensemble, EncoderKeepingEnsemble) and ensemble.encoder_outs is not None:
            encoder_outs, ensemble.encoder_outs = ensemble.encoder_outs, None
            return encoder_outs[0]
        with torch.no_grad():
            return model.encoder.forward_torchscript(sample["net_input"])

    def decoder_inputs(self, sample, hypos) -> Tensor:
        """Teacher-forcing inputs: BOS then every token of the best hypothesis but its last (EOS)."""
        if self._recording_option("moe_stats_decoder") == "reference":
            return sample["net_input"]["prev_output_tokens"]
        best = [sentence_hypos[0]["tokens"] for sentence_hypos in hypos]
        return data_utils.collate_tokens(
            best, self.target_dictionary.pad(), eos_idx=self.decoder_bos(), move_eos_to_beginning=True
        )
