from fairseq_moe_prune.criterions import moe_cross_entropy  # noqa: F401  (registers the criterion)
