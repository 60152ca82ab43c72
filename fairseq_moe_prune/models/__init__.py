from fairseq_moe_prune.models import moe_transformer  # noqa: F401  (registers the model)
