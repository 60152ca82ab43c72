"""The one root of every error meant for the user: ``cli.py`` prints it as one line and exits 1.

The library raises a subclass (CheckpointError, StatsError, SelectionError, MoEConfigError) whose
message is one line; anything else reaching the CLI is a bug, and keeps its traceback. In fairseq's own
commands (the plugin loaded with ``--user-dir``) :func:`one_line_excepthook` does the same for an error of
ours that nothing caught, e.g. a model config refused while ``fairseq-generate`` builds the model.
"""

import sys


class FairseqMoEPruneError(Exception):
    """A user mistake or a hostile / unusable input; the message is one line meant for the user."""


def one_line_excepthook(kind, error, traceback) -> None:
    """``sys.excepthook`` while the plugin is registered: an error of ours that nothing caught is printed as
    one line (the exit status stays 1); any other exception as Python prints it."""
    if issubclass(kind, FairseqMoEPruneError):
        print(f"error: {error}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


def install_excepthook() -> None:
    """Use :func:`one_line_excepthook` unless someone else (an interactive shell) set a hook of their own."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = one_line_excepthook
