"""The base config every method's config starts from, the ``:arg`` string parser, and the
command line's view of the fields: their one-line help and the check of ``--config.a.b`` names.

Defaults live in ``lora_jax.train.config`` (the dataclasses); this turns them into a ConfigDict so
launches can override any field (``--config.optim.lr=1e-3``) and typos fail loudly, with the
closest field named. The help of a field is its ``metadata['help']`` or, failing that, the comment
on its line in the dataclass. Flags live in ``experiments/``; nothing here trains.
"""

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path

import ml_collections

from lora_jax import methods
from lora_jax.train.config import Experiment, to_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``Experiment()`` as a ConfigDict, with LoRA's arguments in ``method_args``."""
    del arg
    config = ml_collections.ConfigDict(to_dict(Experiment()))
    return set_method(config, "lora")


def set_method(config: ml_collections.ConfigDict, name: str, *also: str, **args):
    """``config.method = name`` with ``config.method_args`` holding the arguments of ``name`` and
    of the methods in ``also`` (a config that sweeps several methods holds their union; each run
    passes its method the ones it takes) at their defaults, updated with ``args``. So
    ``--config.method_args.init_weights=pissa`` works and a misspelled argument fails."""
    union = {}
    for n in (name, *also):
        for k, v in methods.arguments(n).items():
            union.setdefault(k, v)
    unknown = sorted(set(args) - set(union))
    if unknown:
        raise KeyError(f"method args {unknown} are not arguments of {[name, *also]}")
    config.method = name
    config.method_args = ml_collections.ConfigDict({**union, **args})
    return config


def parse_arg(arg: str, **defaults) -> dict:
    """``'rank=4,targets=qv'`` -> ``{'rank': 4, 'targets': 'qv'}``, only keys in ``defaults``.

    Values are Python literals where they parse as one, strings otherwise; '+' separates the items
    of a multi-value string (``targets=qv+mlp``) since ',' separates keys.
    """
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config arg {item!r}: expected key=value with key in {sorted(defaults)}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value.replace("+", ",")
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Applies ``{'optim.lr': 1e-3, ...}`` (dotted keys) to a copy of ``config``; unknown keys fail,
    naming the closest field."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.lock()
    paths = field_paths(config)
    for dotted, value in overrides.items():
        if dotted not in paths:
            raise KeyError(f"override {dotted!r}: no such field{did_you_mean(dotted, paths)}")
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], (int, float)) and \
            not isinstance(node[leaf], bool) else value
    return config


SWEEP_SIZES = ("small", "full")
SMALL_STEPS = 150  # a 'small' run: sized for a busy 2-core CPU (docs/ablations.md)


def split_size(arg: str, default: str = "full") -> tuple[str, str]:
    """``'small,rank=4'`` -> ``('small', 'rank=4')``: an optional leading sweep size, then the rest.

    The size (one of ``SWEEP_SIZES``) picks a sweep's grid in ``get_sweep`` and the run length that
    goes with it in ``get_config``, so ``--config=configs/lora.py:small`` means the same to both.
    """
    head, _, rest = (arg or "").partition(",")
    if head.strip() in SWEEP_SIZES:
        return head.strip(), rest
    return default, arg or ""


SEEDS = (0, 1, 2)  # a sweep's adapter seeds: mean ± std over them (``experiments.report``)


def over_seeds(points: list[dict], size: str = "small") -> list[dict]:
    """A 'small' sweep's points once per adapter seed in ``SEEDS`` (``seed``: init, data order,
    dropout), seeds outermost so that a sweep cut short still has every point of its first seeds;
    ``base.seed`` is untouched, so one cached base serves every seed. A 'full' grid is returned as
    it is (one seed: it is sized for an accelerator, and the config tests build every point).
    ``over_seeds([{'adapter.rank': 4}])[:2]`` ->
    ``[{'seed': 0, 'adapter.rank': 4}, {'seed': 1, 'adapter.rank': 4}]``."""
    if size == "full":
        return points
    return [{"seed": s, **p} for s in SEEDS for p in points]


SMALL_LOG_EVERY = 5  # a 'small' run's train loss points: >= 10 even for a 60-step sweep


def apply_size(config: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
    """Denser evals and logging for 'small' runs, so their short loss curves have points to show.

    Neither is part of the cached base model's key: ``trainer.pretrain_experiment`` builds the
    base's own ``TrainConfig`` from ``base.*`` fields only (tested in tests/train/test_cli.py).
    """
    if size == "small":
        config.train.eval_every = 25
        config.train.log_every = SMALL_LOG_EVERY
    return config


PROBE = "probe"  # config arg method=probe: the head alone (method 'saved', no adapter targets)


def classifier_config(arg: str, tasks: tuple[str, ...], head: str,
                      lrs: dict[str, float]) -> ml_collections.ConfigDict:
    """What the encoder-classifier configs (``vit_lora.py``, ``bert_lora.py``) share: the arg
    keys method, rank, targets, steps, lr (with an optional leading size), the method, the
    adapters and the head, the tasks, the learning rate and the run length.

    ``method`` is a registered method, ``'full'`` (every parameter) or ``'probe'``: a linear probe,
    which trains only the ``head`` parameters as modules to save; that is method ``'saved'`` with
    no adapter targets, so no new method. A method that routes by task (``mtl``,
    ``per_task``) gets ``num_tasks=len(tasks)``: the data's task ids are its task ids. The lr is
    ``lr=`` if given, else ``lrs[method]`` (3e-3 for a method not in it). The caller sets the
    model, data kind and batch size.
    """
    size, arg = split_size(arg)
    a = parse_arg(arg, method="lora", rank=8, targets="all-linear",
                  steps=SMALL_STEPS if size == "small" else 300, lr=0.0)
    method = "saved" if a["method"] == PROBE else a["method"]
    config = get_config()
    if method != "full":
        config = set_method(config, method)
    config.method = method
    if "num_tasks" in config.method_args:
        config.method_args.num_tasks = len(tasks)
    config.data.tasks = tuple(tasks)
    config.adapter.rank = a["rank"]
    config.adapter.alpha = 2.0 * a["rank"]
    config.adapter.targets = "" if a["method"] == PROBE else a["targets"]
    config.adapter.modules_to_save = head
    config.optim.lr = a["lr"] or lrs.get(a["method"], 3e-3)
    config.train.steps = a["steps"]
    config.train.eval_every = 100
    config.train.log_every = 25
    return apply_size(config, size)


# ----------------------------------------------------------------------------- the command line


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """The dotted names of a ConfigDict's leaves: ``['method', 'seed', 'model.family', ...]``."""
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += field_paths(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def format_config(config: ml_collections.ConfigDict) -> str:
    """One ``field = value`` line per field, sorted by name (``--print_config``)."""
    lines = []
    for path in field_paths(config):
        node = config
        for part in path.split("."):
            node = node[part]
        lines.append(f"{path} = {node!r}")
    return "\n".join(lines)


def _initials(name: str) -> str:
    return "".join(w[0] for w in name.split("_") if w)


def _leaf_score(leaf: str, cand: str) -> float:
    """How alike two field names are: 1 for an initialism or the same letters (``learning_rate``
    and ``lr``), 0.9 for a prefix (``warmup`` of ``warmup_steps``), else difflib's ratio."""
    if leaf.replace("_", "") == cand.replace("_", "") or leaf == _initials(cand) or \
            cand == _initials(leaf):
        return 1.0
    if min(len(leaf), len(cand)) >= 3 and (cand.startswith(leaf) or leaf.startswith(cand)):
        return 0.9
    return difflib.SequenceMatcher(None, leaf, cand).ratio()


def suggest_field(dotted: str, paths: list[str]) -> str | None:
    """The known field closest to an unknown ``dotted`` name, or None if nothing is close.

    A near field of the same section first; then a field of any section whose name is nearly the
    same (``train.lr`` -> ``optim.lr``); then the closest full name.
    ``suggest_field('optim.learning_rate', paths) == 'optim.lr'``.
    """
    parent, _, leaf = dotted.rpartition(".")
    score = {p: _leaf_score(leaf, p.rpartition(".")[2]) for p in paths}
    same = [p for p in paths if p.rpartition(".")[0] == parent and score[p] >= 0.6]
    anywhere = [p for p in paths if score[p] >= 0.8]
    for group in (same, anywhere):
        if group:
            return max(group, key=score.get)
    close = difflib.get_close_matches(dotted, paths, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(dotted: str, paths: list[str]) -> str:
    """``"; did you mean 'optim.lr'?"`` or ``''``."""
    best = suggest_field(dotted, paths)
    return f"; did you mean {best!r}?" if best else ""


def load_config(config_arg: str) -> ml_collections.ConfigDict:
    """``'configs/lora.py:small'`` -> the file's ``get_config('small')``, as ``--config=`` would."""
    path, sep, arg = config_arg.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} not found")
    spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def _config_flags(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(config arg, ['optim.lr', ...])`` from an argv: the ``--config`` value and the fields of
    the ``--config.a.b=v`` items."""
    config, fields = None, []
    for i, item in enumerate(argv):
        name, sep, value = item.partition("=")
        if name == "--config":
            config = value if sep else (argv[i + 1] if i + 1 < len(argv) else None)
        elif name.startswith("--config."):
            fields.append(name[len("--config."):])
    return config, fields


def config_flags_error(argv: list[str]) -> str | None:
    """One line naming the first user error in an argv's ``--config`` flags, or None.

    Checks that the config file loads and that every ``--config.a.b`` names a field (with the
    closest one suggested), before absl parses the flags and long before a workdir is touched.
    """
    config_arg, fields = _config_flags(argv)
    if config_arg is None:
        return None  # absl reports the missing flag
    try:
        paths = field_paths(load_config(config_arg))
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        return f"--config={config_arg}: {e}"
    for dotted in fields:
        if dotted not in paths:
            return (f"--config.{dotted}: no such config field{did_you_mean(dotted, paths)} "
                    "(--helpshort lists the fields)")
    return None


def describe_method_args() -> str:
    """Each registered method's ``method_args`` (``--config.method_args.<name>=value``) with their
    defaults, one wrapped paragraph per method."""
    lines = [" method_args: the method's keyword arguments (a config holds those of its methods)"]
    for name in methods.known():
        args = ", ".join(f"{k}={v!r}" for k, v in methods.arguments(name).items()) or "(none)"
        lines += textwrap.wrap(f"{name}: {args}", _COLUMNS, initial_indent="  ",
                               subsequent_indent="      ")
    return "\n".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=common.parse_flags)``), after
    ``config_flags_error`` checked the ``--config`` flags: an error there exits with one line,
    unless -v / --verbosity asks for absl's own report and its traceback."""
    from absl import app

    error = config_flags_error(argv)
    if error and not any(a.startswith(("-v", "--v")) for a in argv[1:]):  # -v, --v, --verbosity
        sys.exit(f"error: {error}")
    return app.parse_flags_with_usage(argv)


def field_help(cls: type) -> dict[str, str]:
    """``{field: one-line help}`` of a dataclass: ``metadata['help']``, else its line's comment."""
    comments = {}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app, zip): metadata only
        source = ""
    if source:
        by_line = {tok.start[0]: tok.string.lstrip("#").strip()
                   for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                   if tok.type == tokenize.COMMENT}
        body = ast.parse(source).body[0].body
        comments = {node.target.id: by_line[node.end_lineno] for node in body
                    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and node.end_lineno in by_line}
    return {f.name: f.metadata.get("help") or comments.get(f.name, "")
            for f in dataclasses.fields(cls)}


_COLUMNS = 100  # what --helpshort fits in


def describe_fields(cls: type = Experiment, prefix: str = "", width: int = 34) -> str:
    """Every field of a (nested) config dataclass as ``name = default  help`` lines, by section.

    Sections are headed by the first line of their dataclass's docstring; the defaults are the
    dataclasses' (a config file may change them: ``--print_config`` shows the resolved values).
    """
    lines, sections = [], []
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            sections.append((f.name, type(default)))
            continue
        text = f"  {prefix}{f.name} = {default!r}"
        if len(text) > width:  # a long default: the help goes on the next line
            lines.append(text)
            text = ""
        wrapped = textwrap.wrap(helps[f.name], _COLUMNS - width - 2) or [""]
        lines += [f"{(text if i == 0 else '').ljust(width)}  {h}".rstrip()
                  for i, h in enumerate(wrapped) if text or h]
    for name, sub in sections:
        doc = (inspect.getdoc(sub) or "").split("\n\n")[0].replace("\n", " ")
        if sub.__doc__ is None or doc.startswith(f"{sub.__name__}("):  # dataclass' own signature
            doc = ""
        lines += [""] + textwrap.wrap(f"{prefix}{name}: {doc}".rstrip(": ").replace("``", "'"),
                                      _COLUMNS - 1, initial_indent=" ", subsequent_indent="   ")
        lines.append(describe_fields(sub, f"{prefix}{name}.", width))
    return "\n".join(lines)
