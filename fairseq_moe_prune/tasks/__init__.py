from fairseq_moe_prune.tasks import translation_moe, translation_multi_simple_epoch_moe  # noqa: F401
