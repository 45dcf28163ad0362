r"""Launches one experiment: the only module (with its siblings) that defines flags.

    python -m experiments.train --config=configs/lora.py --workdir=runs/lora
    python -m experiments.train --config=configs/lora.py:rank=4,targets=qv --workdir=runs/r4 \
        --config.optim.lr=1e-3
    python -m experiments.train --config=configs/lora.py:small --print_config

Rerunning the same command resumes from the workdir's newest checkpoint. Any config field below
can be set with --config.<field>=value; --print_config prints the resolved config and exits. A user
error (an unknown field, a bad value) is one line on stderr and exit code 1; with -v 1 (any
verbosity) it comes with its traceback.
"""

import signal
import sys

_EARLY_SIGTERM = []  # a SIGTERM during the imports below: the trainer checkpoints and exits 0
signal.signal(signal.SIGTERM, lambda *_: _EARLY_SIGTERM.append(True))

from absl import app, flags, logging
from ml_collections import config_flags

from configs import common  # noqa: E402
from lora_jax.train import Experiment, from_dict, train_and_evaluate  # noqa: E402
from lora_jax.train.trainer import PREEMPTION  # noqa: E402

__doc__ += ("\nConfig fields, with the dataclasses' defaults (a config file may change them;\n"
            "--print_config shows the values):\n\n" + common.describe_fields() + "\n\n"
            + common.describe_method_args() + "\n")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_PRINT = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(["workdir", "print_config"],
                                     lambda v: bool(v["workdir"] or v["print_config"]),
                                     "--workdir is required (unless --print_config)")


def main(argv):
    verbose = flags.FLAGS["verbosity"].present
    if not verbose:  # orbax logs every checkpoint at INFO; -v 0 shows it
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _PRINT.value:  # 'optim.lr = 0.003' lines: what --config.optim.lr=... would change
        print(common.format_config(_CONFIG.value))
        return
    PREEMPTION.install()
    if _EARLY_SIGTERM:
        PREEMPTION.request()
    try:
        cfg = from_dict(Experiment, _CONFIG.value.to_dict())
        train_and_evaluate(cfg, _WORKDIR.value)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # user errors (bad config, NaN
        # training, a busy workdir, no restorable checkpoint): one line, traceback with -v
        if verbose:
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
