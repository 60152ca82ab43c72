"""fairseq's ``translation_multi_simple_epoch`` (NLLB's task) with MoE gate recording."""

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.tasks import register_task
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from fairseq_moe_prune.tasks.recording_hook import (
    GateRecordingConfig,
    GateRecordingMixin,
)


@register_task("translation_multi_simple_epoch_moe")
class TranslationMultiSimpleEpochMoETask(GateRecordingMixin, TranslationMultiSimpleEpochTask):
    @staticmethod
    def add_args(parser):
        TranslationMultiSimpleEpochTask.add_args(parser)
        gen_parser_from_dataclass(parser, GateRecordingConfig())

    @classmethod
    def setup_task(cls, args, **kwargs):
        # without --langs fairseq orders the language tokens alphabetically, which silently mistranslates
        # with a model trained on another order: the list must be the one the model was trained with
        if not getattr(args, "langs", None):
            raise SystemExit("error: --task translation_multi_simple_epoch_moe needs --langs (the model's language "
                             "list, in its training order; inferring it from --lang-pairs mistranslates)")
        return super().setup_task(args, **kwargs)

    def decoder_bos(self) -> int:
        _, target_langtok_spec = self.args.langtoks["main"]
        if self.args.lang_tok_replacing_bos_eos and target_langtok_spec:
            return self.data_manager.get_decoder_langtok(self.args.target_lang, target_langtok_spec)
        return self.target_dictionary.eos()
