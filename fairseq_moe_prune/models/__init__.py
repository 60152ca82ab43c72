# The model registers from fairseq_moe_prune.register(): layout.py is read without fairseq.
