"""fairseq-moe-prune: record, rank and prune the experts of NLLB-style MoE translation models.

Importing the package (or passing its folder to fairseq's ``--user-dir``) registers its fairseq
components and makes checkpoint loading safe.
"""

import logging

# fairseq's text-to-speech task logs an irrelevant "install tensorboardX" notice on import
logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)

from fairseq_moe_prune.checkpoints.safe_load import (  # noqa: E402
    guard_fairseq_loading,
    install_allowlist,
)

install_allowlist()
guard_fairseq_loading()

from fairseq_moe_prune import criterions, models, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
