"""Launches one experiment: the only module (with its siblings) that defines flags.

    python -m experiments.train --config=configs/lora.py --workdir=runs/lora
    python -m experiments.train --config=configs/lora.py:rank=4,targets=qv --workdir=runs/r4 \
        --config.optim.lr=1e-3

Rerunning the same command resumes from the workdir's newest checkpoint.
"""

import signal

_EARLY_SIGTERM = []  # a SIGTERM during the imports below: the trainer checkpoints and exits 0
signal.signal(signal.SIGTERM, lambda *_: _EARLY_SIGTERM.append(True))

from absl import app, flags, logging
from ml_collections import config_flags

from lora_jax.train import Experiment, from_dict, train_and_evaluate  # noqa: E402
from lora_jax.train.trainer import PREEMPTION  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO; -v 0 shows it
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    PREEMPTION.install()
    if _EARLY_SIGTERM:
        PREEMPTION.request()
    cfg = from_dict(Experiment, _CONFIG.value.to_dict())
    train_and_evaluate(cfg, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
