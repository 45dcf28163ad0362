"""Summarises the runs under a directory: a Markdown and CSV table of final metrics, PNG plots.

    python -m experiments.report runs/rank_targets
    python -m experiments.report runs/rank_targets --out=docs/img/rank_targets --title="Rank"

Writes ``report.md``, ``report.csv``, ``loss_curves.png`` and ``vs_<axis>.png`` (eval loss and mean
accuracy against each swept axis that is not confounded with another; seeds averaged as mean ± std)
into ``--out`` (default: the directory itself) and prints the table within 100 columns, then, when
a seed was swept, the Markdown table of mean ± std over the seeds (eval loss, mean and per-task
accuracy; a seed set by a shared ``--config.seed`` flag counts, see ``lora_jax.report``). A missing
or corrupt ``summary.json`` is named and that run left out; a summary that lacks an optional value
(``tokens_per_sec``, say) shows it blank. Exits non-zero only when no run could be read.
"""

import sys

from absl import app, flags

from lora_jax import report

_OUT = flags.DEFINE_string("out", None, "Where the report goes (default: the runs' directory).")
_TITLE = flags.DEFINE_string("title", None, "Report title (default: the directory's name).")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m experiments.report DIR [--out=DIR] [--title=TEXT]")
    root = argv[1]
    notes = []

    def warn(msg):
        notes.append(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)

    runs = report.load_runs(root, warn=warn)
    if not runs:
        sys.exit(f"no complete run (summary.json) under {root}")
    out = report.write_report(runs, _OUT.value or root, title=_TITLE.value or root, notes=notes)
    print(out["text"])
    if out["seeds"]:
        print("\nMean ± std over seeds:\n\n" + out["seeds"] + "\n")
    print("wrote " + ", ".join(str(p) for p in out["files"]))


if __name__ == "__main__":
    app.run(main)
