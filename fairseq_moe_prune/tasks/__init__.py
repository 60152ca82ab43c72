from fairseq_moe_prune.tasks import translation_moe_recording, translation_multi_simple_epoch_moe  # noqa: F401
