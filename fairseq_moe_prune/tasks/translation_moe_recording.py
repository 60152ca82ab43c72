"""fairseq's ``translation`` task with MoE gate recording (``--moe-stats-out``)."""

from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_moe_prune.tasks.recording_hook import (
    GateRecordingConfig,
    GateRecordingMixin,
)


@dataclass
class TranslationMoERecordingConfig(TranslationConfig, GateRecordingConfig):
    pass


@register_task("translation_moe_recording", dataclass=TranslationMoERecordingConfig)
class TranslationMoERecordingTask(GateRecordingMixin, TranslationTask):
    pass
