"""Reports over finished runs: a table (Markdown and CSV) of final metrics and PNG plots.

    runs = load_runs("runs/rank")                    # every run workdir under the directory
    paths = write_report(runs, "runs/rank")          # report.md, report.csv, *.png

A run is a directory holding ``summary.json`` (written by the trainer when a run completes),
``metrics.jsonl`` (its loss curves) and, for sweep points, ``overrides.json`` (the swept values,
written by ``lora_jax.sweep``). Runs launched without the sweep (``--print_commands``) have no
``overrides.json``; their axes are the config fields that differ between the runs' ``run.json``.
A seed that differs between sweep points' ``run.json`` but is none of their overrides (a shared
``--config.seed=1`` flag, each seed's sweep in its own directory) is one of their axes too.
A missing or corrupt file is reported by name and that run (or line) is left out; the rest still
report. Flags live in ``experiments/report.py``; nothing here trains or launches.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from lora_jax.sweep import format_value, short_keys

_REQUIRED = ("final_eval_loss",)  # what a row is about; every other key may be missing (blank)
_SKIP_DIRS = {"checkpoints", "tb", "adapter"}
_FONT = 8  # legend and tick labels, in points
_WIDTH = 100  # the terminal table's columns


@dataclasses.dataclass
class Run:
    """One finished run: ``name`` (its path under the root), summary, swept values, loss curves."""

    name: str
    workdir: Path
    summary: dict
    overrides: dict
    curves: dict  # 'train' | 'eval' -> [(step, loss), ...]


def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    """Directories under ``root`` (itself included) that hold a run's files, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        if {"summary.json", "run.json", "overrides.json", "metrics.jsonl"} & set(filenames):
            found.append(Path(dirpath))
    return sorted(found)


def _read_json(path: Path, warn: Callable[[str], None]) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        warn(f"{path}: missing")
    except (OSError, ValueError) as e:
        warn(f"{path}: unreadable or not valid JSON ({e})")
    return None


def read_curves(path: Path, warn: Callable[[str], None]) -> dict:
    """``metrics.jsonl`` -> ``{'train': [(step, loss)], 'eval': [...]}``; bad lines are reported."""
    curves = {"train": [], "eval": []}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        warn(f"{path}: unreadable ({e}); no loss curve for this run")
        return curves
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            curves.setdefault(rec["split"], []).append((int(rec["step"]), float(rec["loss"])))
        except (ValueError, KeyError, TypeError):
            warn(f"{path}:{i}: not a metrics record ({line[:60]!r}); line ignored")
    return curves


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def load_runs(root: str | os.PathLike, warn: Callable[[str], None] = print) -> list[Run]:
    """Every complete run under ``root``; what cannot be read is reported through ``warn``."""
    root, runs = Path(root), []
    bare, swept = {}, {}  # run index -> its flattened run.json, without / with overrides.json
    for workdir in find_run_dirs(root):
        path = workdir / "summary.json"
        if not path.exists():
            warn(f"{path}: missing (the run is unfinished or failed); left out")
            continue
        summary = _read_json(path, warn)
        if not isinstance(summary, dict):
            warn(f"{path}: not a run summary; left out")
            continue
        lacking = [k for k in _REQUIRED if k not in summary]
        if lacking:
            warn(f"{path}: lacks {', '.join(lacking)}; left out")
            continue
        overrides = None
        if (workdir / "overrides.json").exists():
            record = _read_json(workdir / "overrides.json", warn)
            overrides = record.get("overrides") if isinstance(record, dict) else None
        if (workdir / "run.json").exists():
            identity = _read_json(workdir / "run.json", warn)
            identity = dict(identity) if isinstance(identity, dict) else {}
            identity.pop("recorded", None)  # environment and data digests: not config axes
            (bare if overrides is None else swept)[len(runs)] = _flatten(identity)
        name = str(workdir.relative_to(root)) if workdir != root else workdir.name
        runs.append(Run(name, workdir, summary, _hashable(overrides or {}),
                        read_curves(workdir / "metrics.jsonl", warn)))
    varying = _varying(bare)  # runs without overrides.json: their axes are the fields that differ
    for i, config in bare.items():
        runs[i].overrides = _hashable({k: config.get(k) for k in varying})
    seeds = [k for k in _varying(swept) if is_seed(k)]  # set by a shared flag: --config.seed=1
    for i, config in swept.items():
        runs[i].overrides.update({k: config.get(k) for k in seeds if k not in runs[i].overrides})
    return runs


def _varying(configs: dict[int, dict]) -> list[str]:
    """The flattened config keys whose values differ between ``configs`` (none for one run)."""
    keys = sorted({k for c in configs.values() for k in c})
    return [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]


def _hashable(overrides: dict) -> dict:
    """JSON lists back to tuples, so swept values can key dicts and sets."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def axes_of(runs: list[Run]) -> list[str]:
    """The swept keys, in order of first appearance."""
    return list(dict.fromkeys(k for r in runs for k in r.overrides))


def is_seed(axis: str) -> bool:
    """Seed axes (``seed``, ``data.seed``) are replicates: averaged, never a line."""
    return axis.rsplit(".", 1)[-1] == "seed"


def determines(runs: list[Run], a: list[str], b: str) -> bool:
    """Whether the values of the axes ``a`` fix the value of axis ``b`` over ``runs`` (``b`` is
    then a function of ``a``: e.g. ``optim.lr`` of ``method`` in a methods sweep)."""
    seen: dict[tuple, Any] = {}
    for r in runs:
        key = tuple(r.overrides.get(x) for x in a)
        if seen.setdefault(key, r.overrides.get(b)) != r.overrides.get(b):
            return False
    return True


def label_axes(runs: list[Run]) -> list[str]:
    """The axes that name a configuration: no seed, and none that the ones before it determine."""
    kept: list[str] = []
    for axis in axes_of(runs):
        if not is_seed(axis) and not (kept and determines(runs, kept, axis)):
            kept.append(axis)
    return kept


def run_label(run: Run, axes: list[str], short: dict[str, str]) -> str:
    """A short label: ``'rank=8, targets=qv'`` (the configuration, seeds left out)."""
    return ", ".join(f"{short[a]}={_short_value(run.overrides.get(a, ''))}" for a in axes) \
        or run.name


def _short_value(value: Any, n: int = 24) -> str:
    text = format_value(value) if value != "" else "–"
    return text if len(text) <= n else text[:n - 1] + "…"


def _sort_key(value: Any):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (1, 0.0, str(value))
    return (0, float(value), "")


def _get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...`` or None where any level is missing."""
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def table(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)`` of raw values: run, the axes, method, params, metrics, throughput.

    A value the run's summary lacks is None (shown blank)."""
    axes = axes_of(runs)
    short = short_keys([{k: None for k in axes}])
    tasks = _tasks(runs)
    method = [] if "method" in axes else ["method"]  # a swept method is already an axis column
    columns = (["run"] + [short[a] for a in axes] +
               method + ["steps", "trainable params", "eval loss", "acc (mean)"] +
               [f"acc {t}" for t in tasks] + ["base acc (mean)", "tokens/s", "train s"])
    rows = []
    for r in sorted(runs, key=lambda r: ([_sort_key(r.overrides.get(a)) for a in axes], r.name)):
        s = r.summary
        rows.append([r.name] + [r.overrides.get(a, "") for a in axes] +
                    [s.get("method")] * len(method) +
                    [s.get("steps"), s.get("trainable_params"), s.get("final_eval_loss"),
                     _get(s, "accuracy", "mean")] + [_get(s, "accuracy", t) for t in tasks] +
                    [_get(s, "base_accuracy", "mean"), s.get("tokens_per_sec"),
                     s.get("train_seconds")])
    return columns, rows


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return format_value(value) if value != "" else "–"
    if column in ("trainable params", "params"):
        return f"{value:,}"
    if column in ("eval loss", "loss"):
        return f"{value:.4f}"
    if column.startswith(("acc", "base acc")):
        return f"{value:.3f}"
    if column == "tokens/s":
        return f"{value:,.0f}"
    if column == "train s":
        return f"{value:.1f}"
    return format_value(value)


def _numeric(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 for v in present)


def to_markdown(columns: list[str], rows: list[list[Any]]) -> str:
    numeric = [_numeric([r[i] for r in rows]) for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(c, v) for c, v in zip(columns, row)) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(columns: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


_TERSE = {"trainable params": "params", "eval loss": "loss", "acc (mean)": "acc",
          "base acc (mean)": "base acc", "tokens/s": "tok/s", "train s": "sec"}
# Left out first when the terminal table is too wide: per-task accuracies (last first), then these.
_DROP_ORDER = ("sec", "base acc", "steps", "tok/s", "method", "params")


def to_text(columns: list[str], rows: list[list[Any]], n_axes: int = 0,
            width: int = _WIDTH) -> str:
    """The table for a terminal: short headers, aligned, at most ``width`` characters a line.

    The run column goes when ``n_axes`` axis columns name the runs; long values are cut with '…';
    while the table is too wide, per-task accuracies and then the less central columns are left
    out, and a last line says which (report.md and report.csv have them all)."""
    cells = [[_short_value(v) if isinstance(v, str) else _cell(c, v) for c, v in zip(columns, r)]
             for r in rows]
    heads = [_TERSE.get(c, c[4:] if c.startswith("acc ") and c != "acc (mean)" else c)
             for c in columns]
    keep = list(range(1 if n_axes else 0, len(columns)))
    numeric = [_numeric([r[i] for r in rows]) for i in range(len(columns))]
    line_len = lambda idx: sum(max(len(heads[i]), *(len(c[i]) for c in cells)) + 2
                               for i in idx) - 2
    tasks = [i for i, c in enumerate(columns) if c.startswith("acc ") and c != "acc (mean)"]
    order = tasks[::-1] + [i for h in _DROP_ORDER for i in range(1 + n_axes, len(heads))
                           if heads[i] == h]  # never an axis column (a swept 'steps', say)
    dropped = []
    while line_len(keep) > width and order:
        i = order.pop(0)
        if i in keep:
            keep.remove(i)
            dropped.append(heads[i])
    widths = {i: max(len(heads[i]), *(len(c[i]) for c in cells)) for i in keep}
    fmt = lambda vals: "  ".join(vals[i].rjust(widths[i]) if numeric[i] else
                                 vals[i].ljust(widths[i]) for i in keep).rstrip()
    lines = [fmt(heads), "  ".join("-" * widths[i] for i in keep)] + [fmt(c) for c in cells]
    if dropped:
        lines.append(f"(left out here: {', '.join(dropped)}; report.md has every column)")
    return "\n".join(lines)


def seed_table(runs: list[Run]) -> str | None:
    """Mean ± std over the seed axes, one row per configuration (Markdown): eval loss, mean
    accuracy and each task's accuracy (a configuration with one finished seed: its values, no
    ± 0); None if no seed axis was swept."""
    seeds = [a for a in axes_of(runs) if is_seed(a)]
    if not seeds:
        return None
    axes = label_axes(runs)
    short = short_keys([{k: None for k in axes_of(runs)}])
    tasks = _tasks(runs)
    metrics = ["eval loss", "acc (mean)"] + [f"acc {t}" for t in tasks]
    lines = ["| " + " | ".join([short[a] for a in axes] + ["seeds"] + metrics) + " |",
             "|" + "|".join(["---"] * len(axes) + ["---:"] * (1 + len(metrics))) + "|"]
    for key, members in _groups(runs, axes).items():
        stats = [_mean_std([m.summary.get("final_eval_loss") for m in members])]
        stats += [_mean_std([_get(m.summary, "accuracy", t) for m in members])
                  for t in ["mean", *tasks]]
        cells = [_short_value(v) for v in key] + [str(len(members))]
        cells += ["" if m is None else f"{m:.{d}f}" + (f" ± {sd:.{d}f}" * (len(members) > 1))
                  for (m, sd), d in zip(stats, [4] + [3] * (1 + len(tasks)))]  # loss, accuracies
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tasks(runs: list[Run]) -> list[str]:
    """The tasks with an accuracy in any run's summary, in order of first appearance."""
    return list(dict.fromkeys(t for r in runs for t in (_get(r.summary, "accuracy") or {})
                              if t != "mean"))


def _groups(runs: list[Run], axes: list[str]) -> dict[tuple, list[Run]]:
    """Runs by their values of ``axes``, in sorted order."""
    out: dict[tuple, list[Run]] = {}
    for r in sorted(runs, key=lambda r: [_sort_key(r.overrides.get(a)) for a in axes]):
        out.setdefault(tuple(r.overrides.get(a, "") for a in axes), []).append(r)
    return out


def _mean_std(values: list[Any]) -> tuple[float | None, float]:
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not xs:
        return None, 0.0
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1))


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", name)


class Colours:
    """One colour per series label, the same in every panel and figure of a report."""

    def __init__(self):
        self.assigned: dict[str, Any] = {}

    def __call__(self, label: str):
        if label not in self.assigned:
            plt = _pyplot()
            palette = plt.get_cmap("tab10" if len(self.assigned) < 10 else "tab20")
            self.assigned[label] = palette(len(self.assigned) % palette.N)
        return self.assigned[label]


def _legend(ax, labels: list[str], colours: Colours) -> None:
    """A legend right of ``ax`` with one entry per series label (none for a single series)."""
    from matplotlib.lines import Line2D

    if len(labels) > 1:
        handles = [Line2D([], [], color=colours(l), marker="o", lw=1) for l in labels]
        ax.legend(handles, labels, fontsize=_FONT, loc="upper left", bbox_to_anchor=(1.02, 1),
                  frameon=False)


def plot_loss_curves(runs: list[Run], path: Path, title: str = "",
                     colours: Colours | None = None) -> Path:
    """Train and eval loss against step, one colour per configuration (its seeds share it)."""
    plt, colours = _pyplot(), colours or Colours()
    axes = label_axes(runs)
    short = short_keys([{k: None for k in axes_of(runs)}])
    fig, axs = plt.subplots(1, 2, figsize=(11, 4), dpi=100, sharey=True)
    labels = []
    for r in sorted(runs, key=lambda r: [_sort_key(r.overrides.get(a)) for a in axes]):
        label = run_label(r, axes, short)
        labels += [label] if label not in labels else []
        for ax, split in zip(axs, ("train", "eval")):
            pts = sorted(r.curves.get(split, []))
            if pts:
                ax.plot(*zip(*pts), marker="." if split == "eval" else None, lw=1,
                        color=colours(label))
    for ax, split in zip(axs, ("train", "eval")):
        ax.set_title(f"{split} loss", fontsize=10)
        ax.set_xlabel("step")
        ax.tick_params(labelsize=_FONT)
        ax.grid(alpha=0.3)
    axs[0].set_ylabel("loss")
    fig.suptitle(f"{title}: loss curves" if title else "loss curves", fontsize=12)
    _legend(axs[1], labels, colours)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plottable_axes(runs: list[Run]) -> list[str]:
    """Axes worth a ``vs_<axis>`` plot: not a seed, and at least one setting of the other axes
    with two or more of its values, so the plot compares something at fixed other settings (an
    axis that only moves together with another, like ``optim.lr`` with ``method`` in a methods
    sweep, is confounded and gets none). An axis in one-to-one step with one already plotted
    (``adapter.alpha`` = 2 x ``adapter.rank``) would draw the same figure again: left out, and
    named in that figure's x label ("rank (sets alpha)")."""
    out = []
    for axis in axes_of(runs):
        if is_seed(axis) or any(determines(runs, [a], axis) and determines(runs, [axis], a)
                                for a in out):
            continue
        others = _others(runs, axis)
        for members in _groups([r for r in runs if axis in r.overrides], others).values():
            if len({r.overrides[axis] for r in members}) > 1:
                out.append(axis)
                break
    return out


def _others(runs: list[Run], axis: str) -> list[str]:
    """The axes that make a plot's series: not seeds, not ``axis``, none that ``axis`` fixes."""
    return [a for a in axes_of(runs)
            if a != axis and not is_seed(a) and not determines(runs, [axis], a)]


def plot_axis(runs: list[Run], axis: str, label: str, path: Path, title: str = "",
              colours: Colours | None = None) -> Path:
    """Final eval loss and mean accuracy against ``axis``; one series per setting of the other
    axes, seeds averaged (mean ± std error bars). Axes that ``axis`` fixes are named in the
    x label ("method (sets lr)")."""
    plt, colours = _pyplot(), colours or Colours()
    short = short_keys([{k: None for k in axes_of(runs)}])
    others = _others(runs, axis)
    tied = [short[a] for a in axes_of(runs)
            if a != axis and not is_seed(a) and a not in others]
    values = sorted({r.overrides[axis] for r in runs if axis in r.overrides}, key=_sort_key)
    numeric = all(_sort_key(v)[0] == 0 for v in values)
    position = {v: (v if numeric else i) for i, v in enumerate(values)}
    fig, axs = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    groups = _groups([r for r in runs if axis in r.overrides], others)
    named = [a for i, a in enumerate(others) if not (i and determines(runs, others[:i], a))]
    names = []
    for g, (key, members) in enumerate(groups.items()):
        name = ", ".join(f"{short[a]}={_short_value(v)}" for a, v in zip(others, key)
                         if a in named) or label
        names.append(name)
        at = _groups(members, [axis])  # x value -> its runs (seeds)
        dodge = 0.0 if numeric else 0.08 * (g - (len(groups) - 1) / 2)  # series side by side
        xs = [position[k[0]] + dodge for k in at]
        for ax, metric in zip(axs, ("loss", "acc")):
            stats = [_mean_std([m.summary.get("final_eval_loss") if metric == "loss"
                                else _get(m.summary, "accuracy", "mean") for m in ms])
                     for ms in at.values()]
            ys = [math.nan if m is None else m for m, _ in stats]
            err = [sd for _, sd in stats] if any(len(ms) > 1 for ms in at.values()) else None
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, lw=1 if numeric else 0,
                        elinewidth=1, color=colours(name), label=name)
    xlabel = label + (f" (sets {', '.join(tied)})" if tied else "")
    seeds = [short[a] for a in axes_of(runs) if is_seed(a)]
    for ax, metric in zip(axs, ("final eval loss", "mean accuracy")):
        ax.set_title(metric + (f", mean ± std over {', '.join(seeds)}" if seeds else ""),
                     fontsize=10)
        ax.set_xlabel(xlabel)
        ax.tick_params(labelsize=_FONT)
        ax.grid(alpha=0.3)
        if numeric and min(values) > 0 and max(values) / min(values) >= 8:
            ax.set_xscale("log", base=2)
            ax.set_xticks(values, [format_value(v) for v in values])
        elif not numeric:
            ax.set_xticks(range(len(values)), [_short_value(v, 16) for v in values])
    fig.suptitle(f"{title}: vs {label}" if title else f"vs {label}", fontsize=12)
    _legend(axs[1], names, colours)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(runs: list[Run], out: str | os.PathLike, title: str = "Report",
                 notes: list[str] = ()) -> dict:
    """Writes ``report.md``, ``report.csv``, ``loss_curves.png`` and one ``vs_<axis>.png`` per
    plottable axis (``plottable_axes``) into ``out``; returns ``{'markdown', 'text', 'seeds',
    'table', 'files'}`` (``text``: the table for a terminal, within 100 columns; ``seeds``: the
    Markdown ``seed_table``, None without a seed axis)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = table(runs)
    markdown = to_markdown(columns, rows)
    (out / "report.csv").write_text(to_csv(columns, rows))
    colours = Colours()
    files = [out / "report.csv",
             plot_loss_curves(runs, out / "loss_curves.png", title, colours)]
    short = short_keys([{k: None for k in axes_of(runs)}])
    for axis in plottable_axes(runs):
        files.append(plot_axis(runs, axis, short[axis], out / f"vs_{_safe(short[axis])}.png",
                               title, colours))
    text = [f"# {title}", "", f"{len(runs)} runs.", "", markdown, ""]
    seeds = seed_table(runs)
    if seeds:
        text += ["Mean ± std over seeds:", "", seeds, ""]
    if notes:
        text += ["Left out or partly read:", ""] + [f"- {n}" for n in notes] + [""]
    text += [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"]
    (out / "report.md").write_text("\n".join(text) + "\n")
    files.insert(0, out / "report.md")
    return {"markdown": markdown, "text": to_text(columns, rows, len(axes_of(runs))),
            "seeds": seeds, "table": (columns, rows), "files": files}
