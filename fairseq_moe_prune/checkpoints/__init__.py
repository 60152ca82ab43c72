"""Reading, pruning and writing checkpoints."""

FORMATS = ("sharded", "single", "hf")  # what ``convert`` reads and writes (checkpoints/convert.py)
