"""The one root of every error meant for the user: ``cli.py`` prints it as one line and exits 1.

The library raises a subclass (CheckpointError, StatsError, SelectionError, MoEConfigError) whose
message is one line; anything else reaching the CLI is a bug, and keeps its traceback.
"""


class FairseqMoEPruneError(Exception):
    """A user mistake or a hostile / unusable input; the message is one line meant for the user."""
