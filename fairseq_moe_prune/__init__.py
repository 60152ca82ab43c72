"""fairseq-moe-prune: record, rank and prune the experts of NLLB-style MoE translation models.

Importing the package (or passing its folder to fairseq's ``--user-dir``) registers its fairseq
components and makes checkpoint loading safe.

Registration needs fairseq, which takes seconds to import, and the console script's ``stats``
commands need neither fairseq nor torch. So the package registers when fairseq is imported: at once
if it already is (fairseq's ``--user-dir`` imports this folder after fairseq itself), otherwise at
the moment something first imports fairseq. A process that never imports fairseq pays nothing.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from typing import Optional

from fairseq_moe_prune.errors import install_excepthook

__version__ = "0.1.0"
USER_DIR = os.path.dirname(os.path.abspath(__file__))  # the folder to pass to fairseq's --user-dir


class NoTensorboardNotice(logging.Filter):
    """Drops the one record fairseq's text-to-speech task logs when it is imported (with every fairseq task,
    so on every start): "Please install tensorboardX". Nothing here writes tensorboard logs; the logger's
    other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please install tensorboardX")


# installed before fairseq can be imported through this package (the console script, the main job, a library
# user who imports this package first); fairseq's own commands import fairseq before any --user-dir
logging.getLogger("fairseq.tasks.text_to_speech").addFilter(NoTensorboardNotice())


def register() -> None:
    """Register the model, tasks and criterion with fairseq and guard its checkpoint loading."""
    # registration order: these import torch and fairseq, which wait until fairseq is imported (see above)
    from fairseq_moe_prune.checkpoints import placed
    from fairseq_moe_prune.checkpoints.safe_load import guard_fairseq_loading, install_allowlist

    install_allowlist()
    guard_fairseq_loading(placed.load_if_placed)  # offloaded or placed experts, sharded releases
    install_excepthook()  # our errors in fairseq's commands (a refused model config): one line, no traceback

    from fairseq_moe_prune import criterions, tasks  # noqa: F401  (registration)
    from fairseq_moe_prune.models import moe_transformer  # noqa: F401  (registration)


# Registration waits while a module of this package is being imported: that module may itself be
# what imported fairseq, and registering then would import modules that need its unfinished names.
importing_depth = 0
registration_pending = False


def register_when_ready() -> None:
    global registration_pending
    if importing_depth == 0 and registration_pending:
        registration_pending = False
        register()


class RegisteringLoader(importlib.abc.Loader):
    """A module's own loader, then (fairseq's, or the outermost of this package's) registration."""

    def __init__(self, loader: importlib.abc.Loader, is_fairseq: bool) -> None:
        self.loader = loader
        self.is_fairseq = is_fairseq

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        global importing_depth, registration_pending
        if self.is_fairseq:
            self.loader.exec_module(module)
            registration_pending = True
        else:
            importing_depth += 1
            try:
                self.loader.exec_module(module)
            finally:
                importing_depth -= 1
        register_when_ready()

    def __getattr__(self, name):  # resource readers and the like: the real loader's
        return getattr(self.loader, name)


class RegisterWhenFairseqImported(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands out fairseq's and this package's specs with a :class:`RegisteringLoader`."""

    def find_spec(self, fullname: str, path, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname == "fairseq":
            sys.meta_path.remove(self)  # fairseq is imported once; this package's later modules need no wrapping
            spec = importlib.util.find_spec(fullname)
        elif fullname.startswith(__name__ + "."):
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        else:
            return None
        if spec is None or spec.loader is None:
            return spec
        spec.loader = RegisteringLoader(spec.loader, is_fairseq=fullname == "fairseq")
        return spec


if "fairseq" in sys.modules:
    register()
elif not any(isinstance(finder, RegisterWhenFairseqImported) for finder in sys.meta_path):
    sys.meta_path.insert(0, RegisterWhenFairseqImported())
