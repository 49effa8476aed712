"""The ``lightning-distill`` command: subcommands from a registry; ``fit`` (LightningCLI) and ``evaluate`` built in.

A job of its own becomes a subcommand with one call, and ``main`` stays as it is::

    register_command("teachers", "train the teacher pool of APM", "lightning_distill.methods.apm:teachers_main")

``fn`` (a callable or a lazily imported ``"module:function"``) receives the arguments after the command's name.
"""

from __future__ import annotations

import importlib
import inspect
import json
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
        """LightningCLI with ``fit`` as its only subcommand: a distillation method has nothing to validate or test."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"fit": LightningCLI.subcommands()["fit"]}

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
    # main hands on the process's own arguments, which LightningCLI would warn about as if they came twice.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
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
    p.add_argument("--output", default=None, help="JSON file; null: <PATH stem>_eval_<protocol>.json beside PATH")
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
    return {
        "path": path,
        "archs": archs,
        "kwargs": kwargs,
        "output": cfg.output,
        "protocol_name": get_protocol(protocol).name,
    }


def evaluate_main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """``lightning-distill evaluate``: print a table (mean ± std per network) and write JSON."""
    fn = _evaluate_function()
    a = parse_evaluate_args(argv, fn)
    results = [fn(a["path"], arch=arch, **a["kwargs"]).to_dict() for arch in a["archs"]]
    print(format_table(results))
    path = Path(a["path"])
    out = Path(a["output"]) if a["output"] else path.with_name(f"{path.stem}_eval_{a['protocol_name']}.json")
    from lightning_distill.provenance import stamp

    write_json(out, {"stamp": stamp(), "results": results})
    print(f"wrote {out}")
    return results


def _evaluate_command(argv: list[str]) -> list[dict[str, Any]]:
    from lightning_distill.export import ExportError

    try:
        return evaluate_main(argv)
    except EvaluateError as e:
        print(f"lightning-distill evaluate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (FileNotFoundError, ExportError) as e:
        sys.exit(f"lightning-distill evaluate: error: {e}")


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


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``lightning-distill`` console script: dispatch to a registered command."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
    return COMMANDS[name].resolve()(rest)


if __name__ == "__main__":
    main()
