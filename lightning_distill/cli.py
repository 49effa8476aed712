"""The ``lightning-distill`` command: subcommands from a registry; ``fit`` (LightningCLI) and ``evaluate`` built in.

A job of its own becomes a subcommand with one call, and ``main`` stays as it is::

    register_command("hello", "print a greeting", "mypackage.commands:hello_main")

``fn`` (a callable or a lazily imported ``"module:function"``) receives the arguments after the command's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import itertools
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI


@dataclass(frozen=True)
class Command:
    """One subcommand: ``lightning-distill <name> ARGS`` calls ``fn(ARGS)``."""

    name: str
    help: str
    fn: Callable[[list[str]], Any] | str
    example: str = ""

    def resolve(self) -> Callable[[list[str]], Any]:
        """The callable (imports a ``"module:function"`` on first use, so ``--help`` stays fast)."""
        if callable(self.fn):
            return self.fn
        module, _, attr = self.fn.partition(":")
        return getattr(importlib.import_module(module), attr)


#: The registered subcommands, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {}

#: LightningCLI's own subcommands that never apply to a distillation method, with the reason ``main`` gives.
REFUSED: dict[str, str] = {
    name: f"'{name}' does not apply to a distillation method (it learns a data set, not a model to {verb}); "
    "score a distilled set with `lightning-distill evaluate PATH`"
    for name, verb in (("validate", "validate"), ("test", "test"), ("predict", "predict with"))
}


def register_command(
    name: str, help: str, fn: Callable[[list[str]], Any] | str | None = None, example: str = ""
) -> Any:
    """Add the subcommand ``lightning-distill <name>``; ``fn(argv)`` gets the arguments after the name.

    Args:
        name: the subcommand; registering a name twice raises.
        help: one line for ``lightning-distill --help``.
        fn: a callable taking the argument list, or ``"module:function"`` imported when the command runs. Without it
            this returns a decorator.
        example: an example command line for ``--help``.
    """
    if not name or name.startswith("-") or any(c.isspace() for c in name):
        raise ValueError(f"a command name is one word not starting with '-', got {name!r}")
    if name in REFUSED:
        raise ValueError(f"{name!r} is refused on purpose: {REFUSED[name]}")

    def add(f: Callable[[list[str]], Any] | str) -> Callable[[list[str]], Any] | str:
        if name in COMMANDS:
            raise ValueError(f"the command {name!r} is already registered")
        COMMANDS[name] = Command(name, help, f, example)
        return f

    return add if fn is None else add(fn)


def usage() -> str:
    """What ``lightning-distill --help`` prints: the registered commands."""
    width = max((len(n) for n in COMMANDS), default=0) + 3
    lines = [f"usage: lightning-distill {{{','.join(COMMANDS)}}} ...", "", "commands:"]
    lines += [f"  {c.name:<{width}}{c.help}" for c in COMMANDS.values()]
    examples = [c.example for c in COMMANDS.values() if c.example]
    if examples:
        lines += ["", "examples:", *(f"  {e}" for e in examples)]
    lines += ["", "lightning-distill COMMAND --help shows the options of a command."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- fit
def flatten_config(config: Any, sep: str = "/") -> dict[str, Any]:
    """A flat ``{key: plain value}`` view of a (nested) config: a jsonargparse ``Namespace`` or a dict.

    Nested mappings join their keys with ``sep``, ``init_args`` levels vanish (``model/synthetic/ipc``), lists of
    scalars stay lists and other lists are numbered (``trainer/callbacks/0/class_path``); anything that is not a
    bool, int, float, str or ``None`` becomes its ``str``.
    """
    tree = config.as_dict() if hasattr(config, "as_dict") else config
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(prefix if k == "init_args" else (f"{prefix}{sep}{k}" if prefix else str(k)), v)
        elif isinstance(value, (list, tuple)) and not all(_is_scalar(v) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}{sep}{i}", v)
        elif isinstance(value, (list, tuple)):
            out[prefix] = [_plain(v) for v in value]
        elif isinstance(value, dict):
            out[prefix] = {}
        else:
            out[prefix] = _plain(value)

    walk("", tree)
    return out


def _is_scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list, tuple))


def _plain(v: Any) -> Any:
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


# LightningCLI and SaveConfigCallback import Lightning (seconds): the two classes below are defined on first use, so
# `lightning-distill --help` and `evaluate` stay quick. `from lightning_distill.cli import LogConfigCallback` works.
_LIGHTNING_CLASSES: dict[str, type] = {}


def _lightning_classes() -> dict[str, type]:
    if _LIGHTNING_CLASSES:
        return _LIGHTNING_CLASSES
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    class LogConfigCallback(SaveConfigCallback):
        """Writes ``config.yaml`` as :class:`SaveConfigCallback` does, and logs the resolved config to every logger.

        The method's own ``save_hyperparameters`` leaves out what it receives as modules and callables (the
        synthetic set, the optimisers), so without this a W&B run would lack the ipc, the labels and the learning
        rates. The config goes to ``logger.log_hyperparams`` as :func:`flatten_config` makes it
        (``model/synthetic/ipc``, plain values). Lightning calls :meth:`save_config` on global rank 0 only.
        """

        def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
            params = flatten_config(self.config)
            for logger in trainer.loggers:
                logger.log_hyperparams(params)

    class DistillCLI(LightningCLI):
        """LightningCLI with ``fit`` as its only subcommand: a distillation method has nothing to validate or test.

        ``fit`` keeps a run in one folder, ``trainer.default_root_dir`` (see :mod:`lightning_distill.resume`): its
        checkpoints go to ``<folder>/checkpoints`` whatever the logger, ``--resume`` (or ``--ckpt_path last``)
        continues from the last one with the same W&B run, and a start that would lose or mix work is refused in one
        line: nothing to resume from, a resume with another recipe, a new run over another run's files (``--fresh``
        moves them aside), a budget of no step or no end.
        """

        run_plan: Any = None

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"fit": LightningCLI.subcommands()["fit"]}

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument(
                "--resume",
                action="store_true",
                help="continue the run in trainer.default_root_dir from its last checkpoint (same W&B run); stops "
                "if there is none or the recipe is another one. Same as --ckpt_path last",
            )
            parser.add_argument(
                "--fresh",
                action="store_true",
                help="start over in a folder holding another run (moves its files to previous/<date>/)",
            )

        def before_instantiate_classes(self) -> None:
            # The W&B id has to be in the logger's arguments before it is built; the checks fail before anything is.
            if self.subcommand == "fit":
                from lightning_distill.resume import RunPlan

                self.run_plan = RunPlan.from_config(self.config["fit"])

        def after_instantiate_classes(self) -> None:
            from lightning_distill.resume import place_checkpoints, use_atomic_checkpoints, use_step_progress_bar

            # Also without the fit subcommand (cli_main(run=False)): the trainer a caller runs itself puts its
            # checkpoints where a resume finds them, writes them atomically and counts steps in its bar.
            place_checkpoints(self.trainer)
            use_atomic_checkpoints(self.trainer)
            use_step_progress_bar(self.trainer)
            if self.run_plan is not None:
                self.run_plan.forget_injected_id()  # the logger has it; config.yaml must not carry it to a new run

        def before_fit(self) -> None:
            if self.run_plan is not None:
                ckpt_path = self.run_plan.prepare(self.trainer, self.datamodule)
                # An explicit path here, not "last": Lightning's own lookup only warns when it finds nothing.
                self.config_init["fit"]["ckpt_path"] = ckpt_path
                # A new run over old checkpoints was refused above, so this warning would only ever fire on a resume.
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    for cls in (LogConfigCallback, DistillCLI):
        cls.__qualname__ = cls.__name__
        _LIGHTNING_CLASSES[cls.__name__] = cls
    return _LIGHTNING_CLASSES


def __getattr__(name: str) -> Any:
    if name in ("LogConfigCallback", "DistillCLI"):
        return _lightning_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the LightningCLI: methods and data chosen by class path (``class_path: FRePo`` works once imported).

    With ``run=True`` the arguments start with the subcommand (``fit``); with ``run=False`` they are the options alone
    and the trainer, method and DataModule come back unrun.
    """
    import lightning_distill.callbacks  # noqa: F401  (makes short class names resolvable in recipes)
    import lightning_distill.synthetic  # noqa: F401
    from lightning_distill.data import RealDataModule
    from lightning_distill.methods import DistillationMethod

    # Methods optimise manually, so Lightning warns that a step checkpoint holds the state after the update. That
    # is the state we want (the set after step N, with global_step N, resumes exactly: see the contract tests).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    classes = _lightning_classes()
    with warnings.catch_warnings():
        if args is not None:
            # Given arguments are the whole command: LightningCLI would warn that the process's own (a benchmark's,
            # or main's, which hands them on) came too, as if they were meant for it.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
        return classes["DistillCLI"](
            DistillationMethod,
            RealDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=classes["LogConfigCallback"],
            args=list(args) if args is not None else None,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "lightning-distill"},
        )


def fit_main(argv: Sequence[str]) -> LightningCLI:
    """``lightning-distill fit``: distil a set with LightningCLI."""
    # A refused start (lightning_distill.resume.RunFolderError, a ValueError) is reported by main in one line.
    return cli_main(["fit", *argv])


# -------------------------------------------------------------------------------------------------------- evaluate
#: Parameters of ``evaluate_distilled`` whose options are written by hand (positional PATH, several networks,
#: ``--no-progress``, strict JSON); every other parameter becomes an option as jsonargparse reads the signature.
EVALUATE_BY_HAND = frozenset({"path", "arch", "progress", "arch_kwargs"})


class EvaluateError(Exception):
    """A bad ``lightning-distill evaluate`` command line (reported in one line)."""


def _evaluate_function() -> Callable[..., Any]:
    # Looked up on every call, so a wrapped or replaced evaluate_distilled is what the command runs.
    import lightning_distill.eval

    return lightning_distill.eval.evaluate_distilled


def evaluate_parser(fn: Callable[..., Any] | None = None) -> Any:
    """The ``evaluate`` parser: ``fn``'s (default ``evaluate_distilled``) typed signature plus the by-hand options."""
    from jsonargparse import ArgumentParser

    from lightning_distill.eval import PROTOCOLS
    from lightning_distill.nets import list_nets

    fn = fn or _evaluate_function()
    p = ArgumentParser(
        prog="lightning-distill evaluate",
        description="Train fresh networks on an exported distilled set; print a table and write JSON.",
        epilog="Options may be spelled with '-' or '_' (--data-path, --data_path).",
        exit_on_error=False,
    )
    p.add_argument("path", nargs="?", help="the distilled.pt written by ExportDistilled")
    p.add_argument("--distilled", default=None, help="same as PATH")
    nets = ", ".join(list_nets())
    p.add_argument(
        "--arch",
        action="append",
        default=None,
        help=f"network(s) from the registry ({nets}); repeat or comma-separate; null: the protocol's network",
    )
    p.add_argument("--arch_kwargs", default=None, help="network options as a JSON object, e.g. '{\"width\": 64}'")
    p.add_argument(
        "--output",
        default=None,
        help="JSON file; null: beside PATH, named after the options (<PATH stem>_eval_<protocol>_<archs>_r<repeats>"
        "[_s<steps>|_e<epochs>][_seed<seed>][_<hash of other options>].json). An existing file is kept: the result "
        "goes to <name>-2.json, -3, ... unless --overwrite",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the --output file (or default name) if it exists")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_function_arguments(fn, skip=set(EVALUATE_BY_HAND), as_group=False, fail_untyped=False)
    for action in p._actions:
        if action.dest == "protocol":  # name the protocols registered now, including any added by other code
            action.help = f"{action.help or ''} Known: {', '.join(sorted(PROTOCOLS))}.".strip()
    return p


def _underscored(argv: Sequence[str], parser: Any) -> list[str]:
    """``--data-path x`` -> ``--data_path x`` where the underscore spelling is an option (kebab case kept working)."""
    known = {s for a in parser._actions for s in a.option_strings}
    out = []
    for i, tok in enumerate(argv):
        if tok == "--":
            return out + list(argv[i:])
        name, eq, value = tok.partition("=")
        if name.startswith("--") and "-" in name[2:]:
            alt = "--" + name[2:].replace("-", "_")
            if alt in known:
                tok = alt + eq + value
        out.append(tok)
    return out


def _one_line(message: str) -> str:
    """A jsonargparse error in one line: ``--key: reason``, and of a union only the informative alternatives."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]) if lines else None
    if key:
        lines[0] = key.group(2)
    if "Errors:" in lines:
        rest = lines[lines.index("Errors:") + 1 :]
        rest = rest[: next((i for i, x in enumerate(rest) if x.startswith("Given value")), len(rest))]
        items = " ".join(rest).split("- ")
        items = [x.strip() for x in items if x.strip()]
        informative = [x for x in items if not x.startswith("Expected a <class")]
        lines = ["; ".join(informative or items)]
    text = " ".join(x for x in lines if x)
    text = re.sub(r"(Expected a )?<class '([\w.]+)'>", lambda m: ("expected " if m[1] else "") + m[2], text)
    return f"--{key.group(1)}: {text}" if key else text


def parse_evaluate_args(argv: Sequence[str], fn: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Parse an ``evaluate`` command line into ``{"path", "archs", "kwargs", "output", "protocol_name"}``.

    ``kwargs`` are ``fn``'s keyword arguments (all but ``arch``); raises :class:`EvaluateError` on a bad line.
    """
    from jsonargparse import ArgumentError

    from lightning_distill.eval import get_protocol
    from lightning_distill.nets import list_nets

    fn = fn or _evaluate_function()
    p = evaluate_parser(fn)
    try:
        cfg = p.parse_args(_underscored(argv, p))
    except ArgumentError as e:
        raise EvaluateError(_one_line(str(e))) from None
    path = cfg.path or cfg.distilled
    if not path:
        raise EvaluateError("give the distilled set: lightning-distill evaluate PATH")
    if cfg.get("repeats") is not None and cfg.repeats < 1:
        raise EvaluateError(f"--repeats must be at least 1, got {cfg.repeats}")
    if isinstance(cfg.get("protocol"), str):
        if cfg.protocol.lstrip().startswith("{"):  # a mapping that failed as a Protocol fell back on the str type
            raise EvaluateError(
                f"--protocol: {cfg.protocol} is not a valid protocol: check its fields and their types "
                "(lightning-distill evaluate --protocol.help)"
            )
        try:
            get_protocol(cfg.protocol)
        except ValueError as e:
            raise EvaluateError(str(e)) from None
    arch_kwargs = None
    if cfg.arch_kwargs:
        hint = "--arch-kwargs must be a JSON object, e.g. '{\"width\": 64}'"
        try:
            arch_kwargs = json.loads(cfg.arch_kwargs)
        except json.JSONDecodeError as e:
            raise EvaluateError(f"{hint}: {e}") from None
        if not isinstance(arch_kwargs, dict):
            raise EvaluateError(f"{hint}, got {cfg.arch_kwargs!r}")
    archs = [s.strip() or None for item in (cfg.arch or [""]) for s in item.split(",")]
    unknown = [s for s in archs if s is not None and s not in list_nets()]
    if unknown:
        raise EvaluateError(f"unknown architecture {', '.join(unknown)}; choose from {', '.join(list_nets())}")

    instantiate = getattr(p, "instantiate", None) or p.instantiate_classes  # jsonargparse < 4.49 has the latter
    try:
        cfg = instantiate(cfg)  # a protocol given as a mapping becomes a Protocol
    except Exception as e:  # a class that refuses its arguments
        raise EvaluateError(_one_line(str(e))) from None
    params = inspect.signature(fn).parameters
    kwargs = {name: cfg[name] for name in params if name not in EVALUATE_BY_HAND and name in cfg}
    if "progress" in params:
        kwargs["progress"] = not cfg.no_progress
    if "arch_kwargs" in params:
        kwargs["arch_kwargs"] = arch_kwargs
    protocol = kwargs.get("protocol", "dc")
    _check_before_training(protocol, archs, kwargs)
    return {
        "path": path,
        "archs": archs,
        "kwargs": kwargs,
        "output": cfg.output,
        "overwrite": bool(cfg.overwrite),
        "protocol_name": get_protocol(protocol).name,
        "default_output": default_output_name(path, archs, kwargs, fn),
    }


def _check_before_training(protocol: Any, archs: list[str | None], kwargs: dict[str, Any]) -> None:
    """Refuse, in one line and before the first network trains, what would make every number of the run wrong.

    ``evaluate_distilled`` checks the same per call; checking here too means a second ``--arch`` cannot fail after
    the first one has trained.
    """
    from lightning_distill.eval.distilled import check_arch_kwargs, check_device, check_length

    try:
        check_length(kwargs.get("steps"), kwargs.get("epochs"))
        check_device(kwargs.get("device"))
        check_arch_kwargs(protocol, archs, kwargs.get("arch_kwargs"))
    except ValueError as e:
        message = str(e)
        for name in ("steps", "epochs"):  # name the command line's option, not the function's parameter
            message = message.replace(f"{name} must be", f"--{name} must be", 1)
        raise EvaluateError(message) from None


#: Options that do not change what an evaluation measures, so they stay out of its default file name.
_NAME_NEUTRAL = frozenset({"progress", "device", "root"})


def default_output_name(path: str, archs: list[str | None], kwargs: dict[str, Any], fn: Callable[..., Any]) -> Path:
    """The JSON file an evaluation writes when ``--output`` is not given: beside PATH, named after what it ran.

    ``<stem>_eval_<protocol>_<arch>-<arch>_r<repeats>``, then ``_s<steps>`` / ``_e<epochs>`` when given, ``_seed<n>``
    when not the default, and a short hash of any other option that differs from its default (network options, a
    protocol given whole, a data path): two evaluations that differ get different names, so neither replaces the
    other.
    """
    from lightning_distill.eval import Protocol, get_protocol

    protocol = kwargs.get("protocol", "dc")
    spec = get_protocol(protocol)
    defaults = {n: p.default for n, p in inspect.signature(fn).parameters.items()}
    parts = [spec.name, "-".join(a or spec.arch for a in archs)]
    if "repeats" in kwargs:
        parts.append(f"r{kwargs['repeats']}")
    for key, tag in (("steps", "s"), ("epochs", "e")):
        if kwargs.get(key) is not None:
            parts.append(f"{tag}{kwargs[key]}")
    if "seed" in kwargs and kwargs["seed"] != defaults.get("seed"):
        parts.append(f"seed{kwargs['seed']}")
    named = {"protocol", "repeats", "steps", "epochs", "seed", *_NAME_NEUTRAL}
    rest = {k: v for k, v in kwargs.items() if k not in named and v != defaults.get(k)}
    if isinstance(protocol, Protocol):  # given whole: its fields, not only its name, say what ran
        rest["protocol"] = protocol.to_dict()
    if rest:
        blob = json.dumps(rest, sort_keys=True, default=str)
        parts.append(hashlib.sha1(blob.encode()).hexdigest()[:8])
    stem = re.sub(r"[^\w.+-]+", "-", "_".join(parts))
    source = Path(path)
    return source.with_name(f"{source.stem}_eval_{stem}.json")


def write_new_json(path: Path, obj: Any, overwrite: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path``, or to ``<stem>-2.json``, ``-3``, ... if it exists; return the file written.

    An existing result is never replaced (unless ``overwrite``): the file is complete before it appears under its
    name, and claiming the name cannot replace a file another evaluation wrote meanwhile (a hard link, which fails
    if the name is taken).
    """
    if overwrite:
        write_json(path, obj)
        return path
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        for n in itertools.count(1):
            target = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            if target.exists():
                continue
            try:
                os.link(tmp, target)
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links: check, then rename
                if target.exists():
                    continue
                os.replace(tmp, target)
            return target
        raise AssertionError("unreachable")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def evaluate_main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """``lightning-distill evaluate``: print a table (mean ± std per network) and write JSON."""
    fn = _evaluate_function()
    a = parse_evaluate_args(argv, fn)
    results = [fn(a["path"], arch=arch, **a["kwargs"]).to_dict() for arch in a["archs"]]
    print(format_table(results))
    out = Path(a["output"]) if a["output"] else a["default_output"]
    from lightning_distill.provenance import stamp

    written = write_new_json(out, {"stamp": stamp(), "results": results}, overwrite=a["overwrite"])
    kept = f" ({out} exists and was kept; --overwrite replaces it)" if written != out else ""
    print(f"wrote {written}{kept}")
    return results


def _evaluate_command(argv: list[str]) -> list[dict[str, Any]]:
    # Errors become one line in main, as for every command.
    return evaluate_main(argv)


def format_table(results: list[dict[str, Any]]) -> str:
    """A markdown table: one row per architecture."""
    lines = [
        "| dataset | ipc | method | arch | protocol | accuracy (%) | nets | steps | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r.get("extra", {})
        lines.append(
            f"| {e.get('dataset', '')} | {e.get('ipc', '')} | {e.get('method', '')} | {r['arch']} | {r['protocol']} "
            f"| {r['mean']:.2f} ± {r['std']:.2f} | {len(r['accuracies'])} | {r['steps']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write."""
    from lightning_distill.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


register_command(
    "fit",
    "distil a set: LightningCLI over methods and real data (fit --help for all options)",
    fit_main,
    example="lightning-distill fit --config recipes/random/mnist_ipc1.yaml",
)
register_command(
    "evaluate",
    "train fresh networks on an exported set; print a table, write JSON",
    _evaluate_command,
    example="lightning-distill evaluate PATH --protocol dc --arch convnet,lenet --repeats 5",
)
register_command(
    "teachers",
    "train (or find in the cache) the teacher pool a recipe needs (APM); progress bar, one file per teacher",
    "lightning_distill.teachers_command:teachers_main",
    example="lightning-distill teachers --config recipes/apm/mnist_ipc10_cpu.yaml",
)
register_command(
    "privacy",
    "membership-inference AUC beside accuracy for an exported set and its real chunk; table, JSON, plot",
    "lightning_distill.eval.privacy_command:privacy_command",
    example="lightning-distill privacy PATH --steps 100,1000,4000 --arch-kwargs '{\"width\": 32}'",
)
register_command(
    "continual",
    "class-incremental continual learning: distil each step's classes from a recipe, retrain on the memory, test",
    "lightning_distill.eval.continual:continual_command",
    example="lightning-distill continual --config recipes/memories/mnist_ipc1_continual_cpu.yaml --orders 0,1,2",
)


# ------------------------------------------------------------------------------------------------------------ main
#: Set to 1 (or pass ``--debug``) to get the traceback of an error instead of its one line.
DEBUG_ENV = "LIGHTNING_DISTILL_DEBUG"


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether a traceback is wanted (``--debug`` anywhere before ``--``, or ``$LIGHTNING_DISTILL_DEBUG``), and argv
    without ``--debug``."""
    end = argv.index("--") if "--" in argv else len(argv)
    flagged = "--debug" in argv[:end]
    rest = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return flagged or env, rest


@contextlib.contextmanager
def _parse_errors_raise() -> Any:
    """Make LightningCLI's parser raise its error instead of printing its usage (dozens of lines) and exiting.

    ``main`` then reports it in one line. LightningCLI is built inside ``cli_main``, so the switch is made on the
    parser class for the duration of the command: exactly what ``exit_on_error=False`` does, raising jsonargparse's
    own ``ArgumentError`` so that jsonargparse's internal retries see the type they expect.
    """
    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningArgumentParser

    def error(self: Any, message: str, ex: Exception | None = None) -> None:
        raise ArgumentError(None, message) from ex

    own = LightningArgumentParser.__dict__.get("error")  # None: it inherits jsonargparse's
    LightningArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del LightningArgumentParser.error
        else:
            LightningArgumentParser.error = own  # type: ignore[method-assign]


class _DropLightningTip(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger, printed at the start of every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud" not in record.getMessage()


def _quiet_fit_start() -> None:
    """Silence the start-up messages of a ``fit`` that a user cannot act on (each matched by its own text)."""
    # A distillation method learns a set, not a model to validate: it has no validation_step on purpose, and the
    # DataModule's val split serves the evaluation callbacks.
    warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
    # Lightning's own use of a torch API torch now deprecates; nothing in a recipe changes it.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    tip = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTip) for f in tip.filters):
        tip.addFilter(_DropLightningTip())


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The errors that mean "the input is wrong" (reported in one line), not "the program is wrong" (a traceback)."""
    types: list[type[BaseException]] = [EvaluateError, ValueError, FileNotFoundError, KeyError]
    # Only modules already imported can have raised their errors; importing one here would cost seconds.
    for module, name in (
        ("jsonargparse", "ArgumentError"),
        ("lightning_distill.methods.base", "NonFiniteMetaStep"),
        ("lightning.fabric.utilities.exceptions", "MisconfigurationException"),  # e.g. an accelerator not here
        ("lightning_fabric.utilities.exceptions", "MisconfigurationException"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            types.append(cls)
    return tuple(types)


def error_line(e: BaseException) -> str:
    """The one line ``main`` prints for a user error: its message, with a parser's many lines reduced to the cause."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        message = e.args[0]  # str(KeyError) would quote it
    else:
        message = str(e)
    if type(e).__name__ == "ArgumentError" or "Does not validate against any of the Union subtypes" in message:
        return _config_error_line(message)
    return " ".join(line.strip() for line in message.splitlines() if line.strip()) or type(e).__name__


def _config_error_line(message: str) -> str:
    """A jsonargparse config error in one line: the full key of a misspelt option, or the class it cannot find."""
    line = _one_line(message)
    option = re.findall(r"Option '([^']+)' is not accepted", message)
    top_level = re.search(r"(?:does not accept option|unrecognized arguments:)\s*'?([^'\s]+)'?", message)
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    if option:
        key = _config_key(message, option[-1])
        owner = ""
        if classes:
            accepted = _options_of(classes[-1])
            owner = f" of {classes[-1]}" + (f" (it takes {', '.join(sorted(accepted))})" if accepted else "")
        return f"{key}: no such option{owner}: check the spelling"
    if top_level:
        key = top_level.group(1).split("=")[0]  # --trainer.max_stepz=1 -> --trainer.max_stepz
        return f"{key}: no such option: check the spelling (lightning-distill fit --help lists them)"
    missing = re.search(r"has no attribute '([^']+)'|Expected a dot import path string: (\S+)", message)
    top = re.match(r'\s*Parser key "([^"]+)"', message)
    if missing and top:
        name = classes[-1] if classes else (missing.group(2) or missing.group(1))
        keys = re.findall(r'Parser key "([^"]+)"', message)
        key = ".".join([keys[0], *(f"init_args.{k}" for k in keys[1:])])
        known = [] if len(keys) > 1 else _known_classes(keys[0])  # a method's or DataModule's own class: listed
        return f"{key}: no class {name} to import" + (f"; known: {', '.join(known)}" if known else "")
    return line


def _config_key(message: str, option: str) -> str:
    """``model.init_args.synthetic.init_args.ipcc``: where a misspelt option sits, from jsonargparse's nested keys."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    given = re.search(r"NestedArg\(key='([^']+)'", message)  # a command-line option names its own full key
    if keys and given:
        inner = given.group(1)
        return f"{keys[0]}.{inner if inner.split('.')[0] in ('class_path', 'init_args') else 'init_args.' + inner}"
    return ".".join([keys[0], *(f"init_args.{k}" for k in keys[1:]), f"init_args.{option}"] if keys else [option])


def _options_of(class_path: str) -> set[str] | None:
    # Only a class the parser has already imported (it just read the recipe): a class path is never imported here.
    module, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if not isinstance(cls, type):
        return None
    from lightning_distill.data import accepted_arguments

    return accepted_arguments(cls)


def _known_classes(key: str) -> list[str]:
    # What a recipe's model/data may name, for the "unknown method / dataset" line.
    if key == "model":
        import lightning_distill.methods as methods

        base = methods.DistillationMethod
        found = [getattr(methods, n) for n in methods.__all__]
        return [
            f"{methods.__name__}.{c.__name__}"
            for c in found
            if isinstance(c, type) and issubclass(c, base) and c is not base
        ]
    if key == "data":
        from lightning_distill.data import registered_datamodules

        return sorted({f"lightning_distill.data.{c.__name__}" for c in registered_datamodules().values()})
    return []


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``lightning-distill`` console script: dispatch to a registered command.

    A wrong input (a bad option, a missing file or data root, a refused export, a run stopped by non-finite steps)
    is reported as ``lightning-distill <command>: error: <message>`` on one line, with exit code 2; ``--debug`` or
    ``LIGHTNING_DISTILL_DEBUG=1`` shows the traceback instead.
    """
    from_console_script = argv is None
    debug, argv = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            sys.exit(2)
        return None
    name, rest = argv[0], argv[1:]
    if name in REFUSED:
        print(f"lightning-distill: error: {REFUSED[name]}", file=sys.stderr)
        raise SystemExit(2)
    if name not in COMMANDS:
        print(f"lightning-distill: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    from lightning_distill.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # large CPU activations stay mapped between steps (see lightning_distill/runtime.py)
    if name == "fit":
        _quiet_fit_start()
    one_line_parse = name == "fit" and not debug
    try:
        with _parse_errors_raise() if one_line_parse else contextlib.nullcontext():
            result = COMMANDS[name].resolve()(rest)
        # The console script hands main's return value to sys.exit, which prints an object and exits 1: a finished
        # run exits 0 there; Python callers get the result (fit's LightningCLI, evaluate's rows).
        return None if from_console_script else result
    except Exception as e:
        if debug or not isinstance(e, _user_error_types()):
            raise
        print(f"lightning-distill {name}: error: {error_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
