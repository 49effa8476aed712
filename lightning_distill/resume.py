"""Run folders for ``lightning-distill fit``: where a run's checkpoints live, how it resumes, what it may not overwrite.

A run's folder is its ``trainer.default_root_dir`` (the recipe's output folder, ``runs/<method>/<recipe>``). It holds

- ``checkpoints/``: every :class:`~lightning.pytorch.callbacks.ModelCheckpoint` without a ``dirpath`` of its own
  writes here (``last.ckpt`` with ``save_last: true``), not under the logger's per-run version or W&B id, so the next
  process finds them. Checkpoints are written atomically: a kill mid-write leaves the previous file whole.
- ``run.json``: the run's identity (method, synthetic set and its ipc, dataset: :func:`recipe_identity`), its W&B run
  id, and a line per start. A resume with another identity is refused instead of mixing two recipes.
- the export (``distilled.pt``, ``distilled.png``), ``config.yaml`` and, with an offline WandbLogger, ``wandb/``.

:class:`RunPlan` decides, from the parsed ``fit`` config, whether this start is a new run, a resume (``--resume`` or
``--ckpt_path last``) or a fresh start over an old run (``--fresh``, which moves the old run's files into
``previous/<date>/``), and refuses, with a one-line :class:`RunFolderError`, what would lose or mix work.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import secrets
import shutil
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_distill.io import atomic_path, remove_orphaned_temporaries

#: The sub-folder of the run folder that checkpoints go to.
CHECKPOINT_DIR = "checkpoints"
#: The run's identity, W&B id and starts, in the run folder.
RUN_FILE = "run.json"
#: Where ``--fresh`` moves an old run's files (one dated sub-folder per start over).
PREVIOUS_DIR = "previous"
#: The resume command, as messages spell it.
RESUME_HINT = "--resume"

# Data arguments that say where the data lives or how it is batched, not which data it is: a resume may change them
# (another machine's data root, a larger batch). Everything else a DataModule takes (val split, normalisation, ZCA,
# a custom set's name and classes) is part of the identity.
_DATA_ARGS_OUTSIDE_IDENTITY = frozenset(
    {"root", "download", "device", "batch_size", "eval_batch_size", "seed", "sampler", "num_workers", "pin_memory"}
)
# How a new set starts: a resumed set is loaded from the checkpoint, so this may differ.
_SYNTHETIC_ARGS_OUTSIDE_IDENTITY = frozenset({"init"})


class RunFolderError(ValueError):
    """A start of ``fit`` that would lose or mix work: refused before anything is written.

    A ``ValueError``, so ``lightning-distill`` reports it as a wrong input: one line, exit status 2.
    """


# ---------------------------------------------------------------------------------------------------- identity
def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return dict(value) if isinstance(value, dict) else {}


def _json_plain(value: Any) -> Any:
    # Tuples become lists and odd objects their str, so an identity read back from run.json compares equal.
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def canonical_class_path(class_path: Any) -> Any:
    """``module.Class`` where the class is defined, so two spellings of one class (a re-export) compare equal."""
    if not isinstance(class_path, str) or "." not in class_path:
        return class_path
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else class_path


def recipe_identity(config: Any) -> dict[str, Any]:
    """What makes two starts the same run: method class, synthetic-set class, ipc and structure, dataset.

    ``config`` is the parsed ``fit`` config (a jsonargparse ``Namespace`` or a dict with ``model`` and ``data``).
    Training knobs (learning rates, steps, batch size, seeds, the data root) are left out: a resume may change them.
    """
    model = _as_dict(config.get("model") if hasattr(config, "get") else None)
    data = _as_dict(config.get("data") if hasattr(config, "get") else None)
    synthetic = _as_dict((model.get("init_args") or {}).get("synthetic"))
    syn_args = dict(synthetic.get("init_args") or {})
    data_args = dict(data.get("init_args") or {})
    return _json_plain(
        {
            "method": canonical_class_path(model.get("class_path")),
            "synthetic": canonical_class_path(synthetic.get("class_path")),
            "ipc": syn_args.get("ipc"),
            "synthetic_args": {
                k: v for k, v in syn_args.items() if k != "ipc" and k not in _SYNTHETIC_ARGS_OUTSIDE_IDENTITY
            },
            "data": canonical_class_path(data.get("class_path")),
            "data_args": {k: v for k, v in data_args.items() if k not in _DATA_ARGS_OUTSIDE_IDENTITY},
        }
    )


def _short(value: Any) -> str:
    # Class paths by their class name; long values cut, so the refusal stays one readable line.
    text = value.rsplit(".", 1)[-1] if isinstance(value, str) and "." in value and " " not in value else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def identity_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["ipc 1 -> 10", "data MNISTDataModule -> FashionMNISTDataModule", "data zca none -> trace"]``."""
    out = []
    for key in ("method", "synthetic", "ipc", "data"):
        if stored.get(key) != current.get(key):
            out.append(f"{key} {_short(stored.get(key))} -> {_short(current.get(key))}")
    for key, label in (("synthetic_args", "synthetic"), ("data_args", "data")):
        a, b = stored.get(key) or {}, current.get(key) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(f"{label} {k} {_short(a.get(k))} -> {_short(b.get(k))}")
    return out


# ------------------------------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class CheckpointInfo:
    """What a resume needs to know of a checkpoint file, read without building the method."""

    path: Path
    step: int
    dataset: str | None = None
    datamodule: str | None = None
    method: str | None = None
    train_seconds: float | None = None


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo | None:
    """The step, dataset and elapsed training time of a checkpoint; ``None`` when it is unreadable (truncated)."""
    path = Path(path)
    try:
        # Lightning loads the same file in full when it resumes; this reads only what the checks need (mmap: the
        # tensors stay on disk). The file is the user's own run's, as trusted as the resume itself.
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        return None
    info = (ckpt.get("lightning_distill") or {}).get("data_info") or {}
    timer = ((ckpt.get("callbacks") or {}).get("Timer") or {}).get("time_elapsed") or {}
    return CheckpointInfo(
        path=path,
        step=int(ckpt["global_step"]),
        dataset=info.get("dataset"),
        datamodule=(info.get("datamodule") or {}).get("class_path"),
        # LightningCLI records the class it built.
        method=canonical_class_path((ckpt.get("hyper_parameters") or {}).get("_class_path")),
        train_seconds=float(timer["train"]) if "train" in timer else None,
    )


def find_resume_checkpoint(dirs: Iterable[str | os.PathLike]) -> tuple[CheckpointInfo | None, list[Path]]:
    """The checkpoint to resume from in ``dirs``, and the unreadable files passed over.

    ``last*.ckpt`` (``save_last``) first, the one with the highest step; without a readable one, the newest readable
    other ``*.ckpt``.
    """
    files = sorted({p for d in dirs if Path(d).is_dir() for p in Path(d).glob("*.ckpt") if p.is_file()})
    last = [p for p in files if p.name.startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST)]
    bad: list[Path] = []
    infos = []
    for p in last:
        info = read_checkpoint(p)
        (infos.append(info) if info else bad.append(p))
    if infos:
        return max(infos, key=lambda i: (i.step, i.path.stat().st_mtime)), bad
    for p in sorted(set(files) - set(last), key=lambda p: p.stat().st_mtime, reverse=True):
        info = read_checkpoint(p)
        if info:
            return info, bad
        bad.append(p)
    return None, bad


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` that writes a local checkpoint to a temporary file and renames it into place.

    Lightning writes ``last.ckpt`` over the previous one in place: a kill mid-write would leave neither. Here the
    previous file stays whole until the new one is complete (remote paths are written as Lightning does).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
        return None


def place_checkpoints(trainer: Trainer) -> list[Path]:
    """Point every ModelCheckpoint without a ``dirpath`` at ``<default_root_dir>/checkpoints``; returns the dirs.

    Lightning would put them under the first logger's folder, which for a WandbLogger is the W&B run id: a new id
    per process, so a resume would never find them.
    """
    stable = os.path.realpath(Path(trainer.default_root_dir) / CHECKPOINT_DIR)
    dirs = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            if cb.dirpath is None:
                # realpath as ModelCheckpoint's own __init__ stores it: a restored callback state matches the dirpath
                # it was saved with only then (and then keeps writing last.ckpt, not last-v1.ckpt).
                cb.dirpath = stable
            dirs.append(Path(cb.dirpath))
    return dirs


def use_atomic_checkpoints(trainer: Trainer) -> None:
    """Write checkpoints with :class:`AtomicCheckpointIO` unless a checkpoint plugin was chosen."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


# ------------------------------------------------------------------------------------------------ progress bar
class StepProgressBar(TQDMProgressBar):
    """The TQDM bar counting outer steps against ``max_steps``: ``1203/2400``, a resumed run from where it resumed.

    Lightning's bar counts batches of the epoch against the loader's length, which the endless real-batch stream
    does not have, so it shows no total; and it would restart at 0 on a resume.
    """

    def _count_steps(self, trainer: Trainer) -> None:
        if trainer.max_steps > 0 and self.train_progress_bar is not None:
            bar = self.train_progress_bar
            bar.total = trainer.max_steps
            bar.initial = bar.n = trainer.global_step  # tqdm measures the rate (and the ETA) from the start position
            if not bar.disable:
                bar.refresh()

    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        # A run resumed mid-epoch gets no on_train_epoch_start: the bar counts steps from here already.
        super().on_train_start(trainer, *args)
        self._count_steps(trainer)

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_start(trainer, *args)
        # Not Lightning's reset to 0 of the epoch's batches, which would first draw the bar at 0 with a negative rate.
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}", refresh=False)
        self._count_steps(trainer)
        return None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and (n % self.refresh_rate == 0 or n == bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
        return None


def use_step_progress_bar(trainer: Trainer) -> None:
    """Replace Lightning's default TQDM bar by :class:`StepProgressBar` (a configured bar is kept as it is)."""
    for i, cb in enumerate(trainer.callbacks):
        if type(cb) is TQDMProgressBar:
            trainer.callbacks[i] = StepProgressBar(refresh_rate=cb.refresh_rate, leave=cb._leave)


class _ExportWhenTrainingSkipped(Callback):
    """Writes the export when Lightning skips training because the resumed checkpoint is already at ``max_steps``.

    Lightning then calls no ``on_train_end``, so ``ExportDistilled`` would write nothing: a run killed between its
    final checkpoint and its export would have none. ``on_fit_end`` still runs, with the checkpoint's set restored.
    """

    def __init__(self) -> None:
        self.trained = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trained = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.trained:
            return
        from lightning_distill.callbacks import ExportDistilled

        for cb in trainer.callbacks:
            if isinstance(cb, ExportDistilled):
                cb.on_train_end(trainer, pl_module)


# ---------------------------------------------------------------------------------------------------- the plan
def check_budget(max_steps: int | None, max_epochs: int | None, max_time: Any) -> None:
    """Refuse a run that trains nothing (``max_steps 0``) or never ends (``max_steps -1`` without a time or epochs)."""
    if max_steps == 0:
        raise RunFolderError(
            "--trainer.max_steps 0 trains nothing and exports nothing: give the number of outer steps "
            "(e.g. --trainer.max_steps 300)"
        )
    if (max_steps is None or max_steps < 0) and max_time is None and max_epochs in (None, -1):
        raise RunFolderError(
            f"--trainer.max_steps {max_steps} with no --trainer.max_time or --trainer.max_epochs never ends (the real "
            "batches are an endless stream): give the number of outer steps (e.g. --trainer.max_steps 300)"
        )


def _new_wandb_id() -> str:
    # W&B's own id alphabet and length (wandb.util.generate_id), without importing wandb here.
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _wandb_logger_configs(logger: Any) -> list[Any]:
    """The config nodes (``class_path`` + ``init_args``) of the WandbLoggers in ``trainer.logger``."""
    from lightning.pytorch.loggers import WandbLogger

    nodes = logger if isinstance(logger, list) else [logger]
    out = []
    for node in nodes:
        class_path = getattr(node, "class_path", None) or (node.get("class_path") if isinstance(node, dict) else None)
        if not isinstance(class_path, str):
            continue
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            cls = None
        if (isinstance(cls, type) and issubclass(cls, WandbLogger)) or class_path.endswith(".WandbLogger"):
            out.append(node)
    return out


def _rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


@dataclass
class RunPlan:
    """How this start of ``fit`` uses its run folder: a new run, a resume, or a fresh start over an old run.

    Built from the parsed config before anything is instantiated (:meth:`from_config`, which also gives the
    WandbLogger the run's id), applied once the trainer exists (:meth:`prepare`, which returns the ``ckpt_path``).
    """

    root: Path
    identity: dict[str, Any]
    resume: bool = False
    fresh: bool = False
    ckpt_path: str | None = None  # an explicit checkpoint file (--ckpt_path FILE)
    record: dict[str, Any] = field(default_factory=dict)  # run.json as found
    wandb_id: str | None = None
    resumed_from: CheckpointInfo | None = None
    passthrough: str | None = None  # a ckpt_path Lightning resolves itself ("best", "hpc"): no run-folder checks
    max_time: Any = None
    _injected: Any = field(default=None, repr=False)  # the logger's init_args the run's W&B id was put into

    @classmethod
    def from_config(cls, config: Any) -> RunPlan | None:
        """Validate the ``fit`` config's budget and flags; ``None`` for a remote root (left to Lightning)."""
        trainer = config.trainer
        check_budget(trainer.get("max_steps"), trainer.get("max_epochs"), trainer.get("max_time"))
        resume, fresh = bool(config.get("resume")), bool(config.get("fresh"))
        ckpt_path = config.get("ckpt_path")
        passthrough = None
        if ckpt_path == "last":  # Lightning's own spelling of a resume: the same checks as --resume
            resume, ckpt_path = True, None
        elif ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):  # Lightning's to resolve
            passthrough, ckpt_path = str(ckpt_path), None
        if resume and (ckpt_path or passthrough):
            raise RunFolderError(f"give {RESUME_HINT} (the run folder's last checkpoint) or --ckpt_path FILE, not both")
        if fresh and (resume or ckpt_path):
            raise RunFolderError("--fresh starts the run over and --resume/--ckpt_path continue it: give one of them")
        root = str(trainer.get("default_root_dir") or os.getcwd())
        if "://" in root:
            return None
        plan = cls(root=Path(root), identity=recipe_identity(config), resume=resume, fresh=fresh, ckpt_path=ckpt_path)
        plan.passthrough, plan.max_time = passthrough, trainer.get("max_time")
        plan.record = plan._read_record()
        plan._assign_wandb_id(trainer.get("logger"))
        return plan

    # -------------------------------------------------------------------------------------------- W&B
    def _assign_wandb_id(self, logger_config: Any) -> None:
        """Give the first WandbLogger without an id of its own the run's id: the stored one on a resume, else new."""
        nodes = _wandb_logger_configs(logger_config)
        if not nodes:
            return
        init_args = nodes[0].init_args if hasattr(nodes[0], "init_args") else nodes[0].setdefault("init_args", {})
        given = init_args.get("id") or init_args.get("version")
        if given:
            self.wandb_id = str(given)
            return
        stored = self.record.get("wandb_run_id")
        if (self.resume or self.ckpt_path) and stored:
            self.wandb_id = stored
        else:
            if self.resume and not stored:
                rank_zero_warn(f"{self.root / RUN_FILE} records no W&B run id: the resumed run logs to a new W&B run")
            self.wandb_id = _new_wandb_id()
        init_args["id"] = self.wandb_id  # WandbLogger passes resume="allow": the same id continues the same run
        self._injected = init_args

    def forget_injected_id(self) -> None:
        """Take the id given to the WandbLogger back out of the config once the logger is built.

        The config is saved as ``config.yaml`` and logged; an id in it would send a new run started from that file
        (``fit --config runs/.../config.yaml``) into this run's W&B run, as an id the user gave does.
        """
        if self._injected is not None:
            self._injected["id"] = None
            self._injected = None

    # ------------------------------------------------------------------------------------------ files
    def _read_record(self) -> dict[str, Any]:
        path = self.root / RUN_FILE
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _work_products(self, ckpt_dirs: list[Path], exports: list[Path]) -> list[Path]:
        """Files of a run that a new run would overwrite or leave beside its own: exports, their scores, checkpoints."""
        found = {p.resolve() for p in self.root.glob("distilled*") if p.is_file()}
        for export in exports:
            found |= {p.resolve() for p in export.parent.glob(f"{export.stem}*") if p.is_file()}
        checkpoints = {p.resolve() for d in ckpt_dirs for p in d.glob("*.ckpt") if p.is_file()}
        # The export first (what a reader of the refusal cares about), then the checkpoints.
        return sorted(found - checkpoints) + sorted(checkpoints)

    def _move_aside(self, products: list[Path]) -> Path:
        """Move an old run's files into ``previous/<date>/`` (the same layout below it); returns that folder."""
        stamp = _dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        dest = self.root / PREVIOUS_DIR / stamp
        n = 1
        while dest.exists():
            n += 1
            dest = self.root / PREVIOUS_DIR / f"{stamp}-{n}"
        extra = [self.root / name for name in (RUN_FILE, "config.yaml")]
        for p in [*products, *(e for e in extra if e.is_file())]:
            rel = _rel(p, self.root)
            target = dest / (rel if not Path(rel).is_absolute() else Path("outside", *Path(rel).parts[1:]))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), str(target))
        return dest

    def _write_record(self, step: int | None) -> None:
        record = {
            "identity": self.identity,
            "wandb_run_id": self.wandb_id or self.record.get("wandb_run_id"),
            "starts": list((self.record.get("starts") or []) if self.resume or self.ckpt_path else []),
        }
        mode = "resume" if (self.resume or self.ckpt_path) else ("fresh" if self.fresh else "new")
        record["starts"].append(
            {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "mode": mode, "step": step}
        )
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / RUN_FILE) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")

    # ---------------------------------------------------------------------------------------- checks
    def _check_identity(self, info: CheckpointInfo, datamodule: Any) -> None:
        stored = self.record.get("identity")
        diffs = identity_differences(stored, self.identity) if stored else []
        if datamodule is not None:
            name = getattr(datamodule, "name", None)
            if info.dataset is not None and name is not None and info.dataset != name:
                diffs.append(f"dataset {info.dataset} -> {name}")
            cls = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
            if not stored and info.datamodule is not None and info.datamodule != cls:
                diffs.append(f"data {_short(info.datamodule)} -> {_short(cls)}")
        # Without a run.json (a checkpoint from elsewhere) the checkpoint's own record is all there is to compare.
        if not stored and info.method is not None and self.identity.get("method") not in (None, info.method):
            diffs.append(f"method {_short(info.method)} -> {_short(self.identity.get('method'))}")
        if diffs:
            raise RunFolderError(
                f"refusing to resume {self.root}: this recipe is not the run's ({'; '.join(dict.fromkeys(diffs))}); "
                "resume with the run's recipe, or start over with --fresh"
            )

    def _check_time(self, info: CheckpointInfo, max_time: Any) -> None:
        if max_time is None or info.train_seconds is None:
            return
        limit = _as_seconds(max_time)
        if limit is not None and info.train_seconds >= limit:
            raise RunFolderError(
                f"the run in {self.root} stopped at its --trainer.max_time ({max_time}, training time counts over all "
                f"resumes) at step {info.step}: raise --trainer.max_time to continue it"
            )

    # ---------------------------------------------------------------------------------------- apply
    def prepare(self, trainer: Trainer, datamodule: Any = None) -> str | None:
        """Check the run folder against this start and set it up; returns the ``ckpt_path`` for ``trainer.fit``.

        Raises :class:`RunFolderError` (before anything is written) on: a resume with nothing to resume from, a resume
        with another recipe, a new run into a folder holding another run's files (without ``--fresh``).
        """
        from lightning_distill.callbacks import ExportDistilled

        ckpt_dirs = [*place_checkpoints(trainer), Path(trainer.default_root_dir) / CHECKPOINT_DIR]
        ckpt_dirs = list(dict.fromkeys(d.resolve() for d in ckpt_dirs))
        exports = [cb.resolve_path(trainer) for cb in trainer.callbacks if isinstance(cb, ExportDistilled)]
        ckpt_path: str | None = None
        moved: Path | None = None
        if self.passthrough:
            return self.passthrough
        if self.resume:
            info, bad = find_resume_checkpoint(ckpt_dirs)
            where = ", ".join(dict.fromkeys(_rel(d, Path.cwd()) for d in ckpt_dirs))
            if info is None:
                saves = any(isinstance(cb, ModelCheckpoint) for cb in trainer.checkpoint_callbacks)
                why = f" ({len(bad)} unreadable)" if bad else ""
                hint = "" if saves else "; this recipe saves none (add a ModelCheckpoint with save_last: true)"
                raise RunFolderError(
                    f"nothing to resume from: no checkpoint in {where}{why}{hint}; "
                    f"run without {RESUME_HINT} to start a new run"
                )
            for p in bad:
                rank_zero_warn(f"passing over the unreadable checkpoint {p}")
            self._check_identity(info, datamodule)
            self._check_time(info, self.max_time)
            ckpt_path = str(info.path)
            self.resumed_from = info
        elif self.ckpt_path:
            info = read_checkpoint(self.ckpt_path)
            if info is None:
                raise RunFolderError(f"--ckpt_path {self.ckpt_path}: not a readable checkpoint")
            self._check_identity(info, datamodule)
            ckpt_path, self.resumed_from = self.ckpt_path, info
        else:
            products = self._work_products(ckpt_dirs, exports)
            if products and not self.fresh:
                names = [_rel(p, self.root) for p in products]
                shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
                raise RunFolderError(
                    f"{self.root} holds another run ({shown}): continue it with {RESUME_HINT}, or start over with "
                    f"--fresh (moves its files to {self.root / PREVIOUS_DIR}/<date>/)"
                )
            if products and _rank_zero():
                moved = self._move_aside(products)

        if _rank_zero():
            for folder in dict.fromkeys([self.root, *ckpt_dirs, *(e.parent for e in exports)]):
                for p in remove_orphaned_temporaries(folder):
                    rank_zero_info(f"removed {p}, left by a write that was killed")
            self._write_record(self.resumed_from.step if self.resumed_from else None)
        if moved is not None:
            rank_zero_info(f"--fresh: moved the previous run's files to {moved}")
        if self.resumed_from is not None:
            info = self.resumed_from
            if trainer.max_steps > 0 and info.step >= trainer.max_steps:
                rank_zero_info(
                    f"the run already reached step {info.step} (max_steps {trainer.max_steps}): nothing to train, the "
                    "export is written from its checkpoint; raise --trainer.max_steps to continue it"
                )
                trainer.callbacks.append(_ExportWhenTrainingSkipped())
            else:
                rank_zero_info(f"resuming from {info.path} at step {info.step}")
        return ckpt_path


def _as_seconds(max_time: Any) -> float | None:
    """``trainer.max_time`` ("DD:HH:MM:SS", a timedelta or a dict of its fields) in seconds."""
    if isinstance(max_time, _dt.timedelta):
        return max_time.total_seconds()
    if isinstance(max_time, str):
        try:
            d, h, m, s = (int(x) for x in max_time.split(":"))
        except ValueError:
            return None
        return float(((d * 24 + h) * 60 + m) * 60 + s)
    if isinstance(max_time, dict):
        return _dt.timedelta(**max_time).total_seconds()
    return None
