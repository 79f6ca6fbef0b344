"""Typed experiment configs: dataclasses filled from YAML presets plus command-line overrides.

A config is resolved in three layers, each one overriding the previous:

1. the dataclass defaults below,
2. a preset: ``star/configs/NAME.yaml`` (shipped in the package) or a YAML file path; a preset
   may name another one with ``base: OTHER`` and then only states what differs,
3. ``key.sub=value`` overrides from the command line; values are parsed as YAML scalars
   (``optim.base_lr=2e-4``, ``model.sep_type=token``, ``schedule.max_steps=null``).

Every key is checked against the dataclasses: an unknown or misspelled key is an error that
names it and the closest valid key, so a typo can never silently train the wrong recipe.
The resolved config is written to ``RUN_DIR/config.yaml`` and is what a resumed run reloads.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from star.errors import ConfigError  # noqa: F401 - re-exported: star.config.ConfigError
from star.models import StarPretrainConfig, all_settings, list_models, model_config, model_settings
from star.models.settings import flat_values

PRESET_DIR = Path(__file__).resolve().parent / "configs"

# model settings whose null means "filled in from the data at start-up" (star.train.finetune)
FILLED_FROM_DATA = ("num_classes",)


@dataclass
class ModelConfig:
    """Which network to build: a registry name (``star.models.list_models()``) plus overrides
    of that model's configuration dataclass (``StarPretrainConfig`` with its ``PackingConfig``,
    or ``StarClassifierConfig``), written flat: ``model.sep_type``, ``model.depth``, ...

    The defaults are the model's own (``star.models.model_config(name)``); an override left
    out or set to null keeps them (a null setting of the other model family is ignored),
    except ``num_classes: null`` in fine-tuning, which means the training manifest's class
    count (it reads back as None until filled). Reading
    ``cfg.model.KEY`` gives the override, else the model's value; ``images_per_seq`` is 1 for
    a fine-tuning model (one image per input).
    """

    name: str = "star_base_pz16"
    overrides: dict = field(default_factory=dict)
    # Mamba kernel path (star/ops/dispatch.py require_kernels): auto | fused (refuse to start
    # without them) | torch. A run setting, not a model hyper-parameter: never passed to create_model.
    kernels: str = "auto"

    def __getattr__(self, key: str) -> Any:
        # only called for names that are not attributes: the model's settings
        if key.startswith("_") or "overrides" not in self.__dict__:
            raise AttributeError(key)
        if self.overrides.get(key) is not None or (key in self.overrides and key in FILLED_FROM_DATA):
            return self.overrides[key]
        values = flat_values(self.resolved())
        if key not in values:
            raise AttributeError(f"model {self.name!r} has no setting {key!r}")
        return values[key]

    def __setattr__(self, key: str, value: Any) -> None:
        if key in ("name", "overrides", "kernels"):
            object.__setattr__(self, key, value)
        else:  # a derived value filled in later (num_classes from the manifest)
            self.overrides[key] = value

    @property
    def images_per_seq(self) -> int:
        """N images per sequence (pretraining), 1 for a fine-tuning model."""
        config = self.resolved()
        return config.packing.images_per_seq if isinstance(config, StarPretrainConfig) else 1

    def model_overrides(self) -> dict[str, Any]:
        """The overrides ``create_model`` receives (the non-null ones)."""
        return {k: v for k, v in self.overrides.items() if v is not None}

    def resolved(self):
        """The model's configuration instance: ``model_config(name, **model_overrides())``."""
        return model_config(self.name, **self.model_overrides())

    def to_dict(self) -> dict:
        return {"name": self.name, **self.overrides, "kernels": self.kernels}


@dataclass
class DataConfig:
    """Where the shards are and how the loader reads them (``pipelines.build_loader``)."""

    dir: str = "data/imagenet_shards"
    train_split: str = "train"
    val_split: str = "val"
    backend: str = "dali"          # dali | baseline
    num_threads: int = 4
    on_corrupt: str = "error"      # error | skip
    # Extra keyword arguments for build_loader (augmentation knobs); the loader checks them.
    loader_kwargs: dict = field(default_factory=dict)


@dataclass
class BatchConfig:
    """Batch sizes in images; sequences per step follow from model.images_per_seq."""

    global_images: int = 2048      # images per optimizer step over all ranks
    micro_images: int = 256        # images per rank per forward/backward (multiple of N)


@dataclass
class OptimConfig:
    """AdamW with per-group weight decay; lr = base_lr * global_images / 256."""

    base_lr: float = 1.5e-4
    # the cosine's floor, an absolute lr (not scaled by the batch), times each group's layer-decay
    # scale: ARM's `--min_lr` (Finetuning/main_finetune.py 1e-6, main_pretrain.py 0)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # max global gradient norm; null or 0 = no clipping (ARM's fine-tuning `--clip_grad None`)
    grad_clip: float | None = 3.0
    layer_decay: float | None = None  # fine-tuning: layer-wise lr decay (0.65 for B)
    # true: ARM's rule (A_log and ar_token decay; only 1-D params, position tables and class
    # tokens are exempt); false: A_log, D and the learned tokens are exempt too (our first
    # recipe). docs/fidelity.md, "weight-decay rule".
    ssm_weight_decay: bool = True


@dataclass
class ScheduleConfig:
    """Linear warmup then cosine decay, evaluated per optimizer step."""

    epochs: int = 1600
    warmup_epochs: float = 40.0
    max_steps: int | None = None   # stop (as finished) after this many steps; schedule unchanged


@dataclass
class MixupConfig:
    """Fine-tuning label mixing (``star.train.mixup.Mixup``); all zero disables it."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.99992


@dataclass
class CheckpointConfig:
    every_steps: int = 1000        # plus one at every epoch end
    keep_last: int = 3             # complete checkpoints kept on disk (the newest ones)


@dataclass
class LogConfig:
    every_steps: int = 20          # console line cadence; metrics.jsonl gets every step
    tensorboard: bool = True       # when the tensorboard package is installed
    # At the first non-finite step of a streak, re-run its micro-batch with hooks and write
    # RUN_DIR/nonfinite/step_S/report.json (star/train/nonfinite.py); training is unchanged.
    diagnose_nonfinite: bool = True
    # Loss spike: loss > mean + spike_k * std of the last spike_window finite losses (after
    # spike_min_samples of them); a warning and a count in metrics, never a decision.
    spike_k: float = 6.0
    spike_window: int = 200
    spike_min_samples: int = 50
    sample_indices: bool = False   # debug: each step's sample indices (all ranks) in metrics.jsonl


@dataclass
class MonitorConfig:
    """Feature quality during pretraining (star/train/monitor.py): DINO's weighted k-NN (k = 20,
    T = 0.07, star/probe/knn.py) of a fixed val subset against a fixed train subset, on the
    frozen encoder, every ``knn_every_epochs`` epochs and at the last one. Pretraining only."""

    knn_every_epochs: int = 0      # 0 = off
    knn_train_images: int | None = 10000  # subset of data.train_split fixed by `seed`; null = all
    knn_val_images: int | None = 5000     # subset of data.val_split fixed by `seed`; null = all
    knn_pool: str = "mean"         # mean of the image's output tokens | last (its last token)


@dataclass
class Config:
    """One experiment: everything `star pretrain` / `star finetune` needs besides the run dir."""

    kind: str = "pretrain"         # pretrain | finetune
    name: str = ""                 # preset the config was resolved from (informational)
    seed: int = 0
    device: str = "auto"           # auto (cuda if available) | cpu | cuda
    ds_config: str = "auto"        # auto | a name in star/ds_configs/ | a path to a JSON file
    max_nonfinite_in_row: int = 20  # consecutive non-finite steps before the run stops
    init: str | None = None        # fine-tuning: run dir, exported file or ARM checkpoint
    init_allow_partial: bool = False  # fine-tuning: accept an init that leaves encoder params random
    eval_every_epochs: int = 1     # fine-tuning: validation cadence (and at the last epoch)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()  # the YAML layout: name and overrides side by side
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# Allowed values of string fields; checked after resolution so a typo in a value fails too.
# The model's settings declare their own (star.models.settings.choice_field).
CHOICES: dict[str, tuple] = {
    "kind": ("pretrain", "finetune"),
    "device": ("auto", "cpu", "cuda"),
    "model.kernels": ("auto", "fused", "torch"),
    "data.backend": ("dali", "baseline"),
    "data.on_corrupt": ("error", "skip"),
    "monitor.knn_pool": ("mean", "last"),
}


# Valid ranges of numeric fields, as intervals; checked after resolution (null = unset is always
# allowed for optional fields). Every int / float field outside `model.` must appear here
# (tests/test_config.py checks it); the model's own fields are checked by its config class.
RANGES: dict[str, str] = {
    "seed": "[0, inf)",
    "max_nonfinite_in_row": "[1, inf)",
    "eval_every_epochs": "[1, inf)",
    "data.num_threads": "[1, 256]",
    "batch.global_images": "[1, inf)",
    "batch.micro_images": "[1, inf)",
    "optim.base_lr": "(0, 1]",
    "optim.min_lr": "[0, 1]",
    "optim.weight_decay": "[0, 1]",
    "optim.eps": "(0, 1)",
    "optim.grad_clip": "[0, inf)",
    "optim.layer_decay": "(0, 1]",
    "schedule.epochs": "[1, inf)",
    "schedule.warmup_epochs": "[0, inf)",
    "schedule.max_steps": "[1, inf)",
    "mixup.mixup_alpha": "[0, inf)",
    "mixup.cutmix_alpha": "[0, inf)",
    "mixup.prob": "[0, 1]",
    "mixup.switch_prob": "[0, 1]",
    "mixup.label_smoothing": "[0, 1)",
    "ema.decay": "[0, 1)",
    "checkpoint.every_steps": "[1, inf)",
    "checkpoint.keep_last": "[1, inf)",
    "log.every_steps": "[1, inf)",
    "log.spike_k": "(0, inf)",
    "log.spike_window": "[2, inf)",
    "log.spike_min_samples": "[2, inf)",
    "monitor.knn_every_epochs": "[0, inf)",
    "monitor.knn_train_images": "[1, inf)",
    "monitor.knn_val_images": "[1, inf)",
}


def _in_range(value: float, interval: str) -> bool:
    lo_br, lo, hi, hi_br = interval[0], *interval[1:-1].split(","), interval[-1]
    lo, hi = float(lo), float(hi)
    above = value >= lo if lo_br == "[" else value > lo
    below = value <= hi if hi_br == "]" else value < hi
    return above and below


def _check_ranges(data: dict) -> None:
    for key, interval in RANGES.items():
        node: Any = data
        for part in key.split("."):
            node = node[part]
        if node is not None and not _in_range(node, interval):
            raise ConfigError(f"config key `{key}` = {node!r} is outside its valid range {interval}")


# ----------------------------------------------------------------------------- key walking


def _hints(cls) -> dict[str, Any]:
    if cls is ModelConfig:  # the model's settings as optional fields (null = the model's value)
        return {"name": str, "kernels": str, **{name: s.type | None for name, s in all_settings().items()}}
    return typing.get_type_hints(cls)


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config dataclass (``optim.base_lr``, ...)."""
    if cls is ModelConfig:  # a name plus the settings of any model family
        return [prefix + "name", prefix + "kernels"] + [prefix + name for name in all_settings()]
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _suggest(key: str) -> list[str]:
    """Valid keys closest to a wrong one: the same leaf in another section (`train.epochs` ->
    `schedule.epochs`), else a close leaf in the same section, else a close key anywhere.
    Two are offered only when they are about equally close (`optim.lr`: min_lr or base_lr)."""
    keys = valid_keys()
    section, _, leaf = key.rpartition(".")

    def ratio(a: str, b: str) -> float:
        return difflib.SequenceMatcher(None, a, b).ratio()

    def best(scored: list[tuple[float, str]], cutoff: float) -> list[str]:
        scored = sorted((s for s in scored if s[0] >= cutoff), reverse=True)
        return [k for s, k in scored[:2] if s >= scored[0][0] - 0.08] if scored else []

    same_leaf = [(ratio(key, k), k) for k in keys if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return best(same_leaf, 0.0)
    in_section = [(ratio(leaf, k.rpartition(".")[2]), k) for k in keys if k.rpartition(".")[0] == section]
    return (best(in_section, 0.4) or best([(ratio(key, k), k) for k in keys], 0.5)
            or best([(ratio(leaf, k.rpartition(".")[2]), k) for k in keys], 0.4))


def _unknown_key(key: str, where: str) -> ConfigError:
    close = _suggest(key)
    if close:
        hint = "; did you mean " + " or ".join(f"`{c}`" for c in close) + "?"
    else:
        hint = f"; valid keys: {', '.join(valid_keys())}"
    return ConfigError(f"unknown config key `{key}` in {where}{hint}")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and lightly convert) a YAML value against a field's type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    bad = ConfigError(f"config key `{key}` in {where}: expected {getattr(tp, '__name__', tp)}, "
                      f"got {value!r} ({type(value).__name__})")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value


def _merge(target: dict, updates: dict, cls, where: str, prefix: str = "") -> None:
    """Deep-merge ``updates`` into ``target`` (a dict shaped like ``cls``), validating keys."""
    hints = _hints(cls)
    for name, value in updates.items():
        key = prefix + str(name)
        if name not in hints:
            raise _unknown_key(key, where)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key `{key}` in {where} is a section; give its keys "
                                  f"(e.g. `{key}.{dataclasses.fields(tp)[0].name}: ...`), got {value!r}")
            _merge(target[name], value, tp, where, key + ".")
        else:
            target[name] = _coerce(value, tp, key, where)


def _from_dict(cls, data: dict):
    if cls is ModelConfig:
        return ModelConfig(data["name"], {k: v for k, v in data.items() if k not in ("name", "kernels")},
                           data.get("kernels", "auto"))
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        kwargs[f.name] = _from_dict(tp, data[f.name]) if dataclasses.is_dataclass(tp) else data[f.name]
    return cls(**kwargs)


# ----------------------------------------------------------------------------- presets


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file's content; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the file (a YAML mapping of "
                          f"config keys, as in star/configs/*.yaml)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    close = difflib.get_close_matches(name_or_path, list_presets(), n=3)
    hint = f" Closest presets: {', '.join(close)}." if close else ""
    raise ConfigError(f"no preset or YAML file named {name_or_path!r}.{hint} "
                      f"Presets: {', '.join(list_presets())}.")


def _load_preset_chain(name_or_path: str, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """The preset and its ``base:`` ancestors, oldest first."""
    path = _preset_path(name_or_path)
    if path in seen:
        raise ConfigError(f"preset cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a YAML mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    chain = _load_preset_chain(str(base), seen + (path,)) if base else []
    return chain + [(path, data)]


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """``["a.b=1", ...]`` -> ``[("a.b", "1"), ...]`` with a clear error for malformed items."""
    pairs = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value "
                              f"(e.g. optim.base_lr=2e-4)")
        pairs.append((key.strip(), raw))
    return pairs


def _override_value(key: str, raw: str) -> Any:
    """Parse a command-line value as YAML, except that string fields take the raw text
    (YAML would turn `on`/`no` into booleans)."""
    cls: Any = Config
    parts = key.split(".")
    for part in parts[:-1]:
        hints = _hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            raise _unknown_key(key, "the command line")
        cls = hints[part]
    hints = _hints(cls)
    if parts[-1] not in hints:
        raise _unknown_key(key, "the command line")
    tp = hints[parts[-1]]
    if tp is str and raw != "":
        return raw
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}={raw!r}: not a YAML value ({exc})") from None
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp) \
            and value is not None:
        return raw
    return value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def validate(cfg: Config) -> Config:
    """Value checks that the types alone cannot express."""
    data = cfg.to_dict()
    for key, allowed in CHOICES.items():
        node: Any = data
        for part in key.split("."):
            node = node[part]
        if node not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"config key `{key}` = {node!r} is not one of: {shown}")
    _check_ranges(data)
    _validate_model(cfg.model)
    positive = {"batch.global_images": cfg.batch.global_images, "batch.micro_images": cfg.batch.micro_images,
                "model.images_per_seq": cfg.model.images_per_seq, "schedule.epochs": cfg.schedule.epochs,
                "checkpoint.every_steps": cfg.checkpoint.every_steps, "checkpoint.keep_last": cfg.checkpoint.keep_last,
                "log.every_steps": cfg.log.every_steps, "log.spike_k": cfg.log.spike_k,
                "log.spike_window": cfg.log.spike_window, "log.spike_min_samples": cfg.log.spike_min_samples,
                "max_nonfinite_in_row": cfg.max_nonfinite_in_row,
                "eval_every_epochs": cfg.eval_every_epochs}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key `{key}` must be positive, got {value}")
    if cfg.log.spike_min_samples > cfg.log.spike_window:
        raise ConfigError(f"log.spike_min_samples={cfg.log.spike_min_samples} exceeds log.spike_window="
                          f"{cfg.log.spike_window}: no spike could ever be flagged; lower it")
    if cfg.batch.micro_images % cfg.model.images_per_seq:
        raise ConfigError(f"batch.micro_images={cfg.batch.micro_images} is not a multiple of "
                          f"model.images_per_seq={cfg.model.images_per_seq} (N images make one sequence)")
    if not 0 <= cfg.schedule.warmup_epochs <= cfg.schedule.epochs:
        raise ConfigError(f"schedule.warmup_epochs={cfg.schedule.warmup_epochs} must lie in "
                          f"[0, schedule.epochs={cfg.schedule.epochs}]")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {cfg.optim.betas}")
    if cfg.optim.layer_decay is not None and not 0 < cfg.optim.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay must lie in (0, 1], got {cfg.optim.layer_decay}")
    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay must lie in [0, 1), got {cfg.ema.decay}")
    if cfg.kind == "finetune" and cfg.monitor.knn_every_epochs:
        raise ConfigError(f"monitor.knn_every_epochs={cfg.monitor.knn_every_epochs}: the k-NN monitor probes a "
                          f"pretraining encoder; fine-tuning evaluates every eval_every_epochs instead (set "
                          f"monitor.knn_every_epochs=0)")
    return cfg


def _validate_model(model: ModelConfig) -> None:
    """The model section against the named model's configuration dataclass."""
    if model.name not in list_models():
        close = difflib.get_close_matches(model.name, list_models(), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; models: {', '.join(list_models())}"
        raise ConfigError(f"config key `model.name` = {model.name!r} is not a model{hint}")
    known = model_settings(model.name)
    for key, value in model.overrides.items():
        if key not in known and value is not None:  # the other family's (cls_position on pretraining)
            family = type(model_config(model.name)).__name__
            raise ConfigError(f"config key `model.{key}` is not a setting of {model.name} ({family}); "
                              f"its settings: {', '.join(known)}")
        choices = known[key].choices if key in known else None
        if value is not None and choices is not None and value not in choices:
            raise ConfigError(f"config key `model.{key}` = {value!r} is not one of: {', '.join(choices)}")
    try:
        model.resolved()
    except ValueError as exc:
        raise ConfigError(f"model section ({model.name}): {exc}") from None


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Resolve defaults <- preset chain (or ``base``, a run's saved config dict, read through
    :func:`upgrade_saved_config`) <- overrides."""
    data = Config().to_dict()
    if base is not None:
        _merge(data, upgrade_saved_config(base), Config, "the saved run config")
    if name_or_path is not None:
        for path, layer in _load_preset_chain(name_or_path):
            _merge(data, layer, Config, str(path))
        data["name"] = Path(name_or_path).stem if name_or_path.endswith((".yaml", ".yml")) else name_or_path
    for key, raw in parse_overrides(overrides or []):
        _merge(data, _nest(key, _override_value(key, raw)), Config, "the command line")
    return validate(_from_dict(Config, data))


def upgrade_saved_config(data: Any) -> Any:
    """A run's saved ``config.yaml`` as today's keys read it. A file without
    ``optim.ssm_weight_decay`` was written before the separator-position and weight-decay options
    (docs/fidelity.md): its run used learned separator positions and exempted A_log, D and the
    tokens from weight decay, so those values are filled in and a resumed run keeps its recipe
    (a resume with today's defaults is then refused, naming the keys)."""
    if not isinstance(data, dict) or "ssm_weight_decay" in (data.get("optim") or {}):
        return data
    data = {**data, "optim": {**(data.get("optim") or {}), "ssm_weight_decay": False}}
    if data.get("kind", "pretrain") == "pretrain":
        data["model"] = {"sep_pos_embed": "learned", "dec_sep_pos_embed": "learned", **(data.get("model") or {})}
    return data


def diff_configs(a: Config, b: Config) -> dict[str, tuple[Any, Any]]:
    """Leaf keys whose values differ: ``{key: (a_value, b_value)}``."""
    out = {}
    da, db = a.to_dict(), b.to_dict()
    for key in valid_keys():
        va, vb = da, db
        for part in key.split("."):  # a model setting may be absent (not overridden)
            va, vb = va.get(part), vb.get(part)
        if va != vb:
            out[key] = (va, vb)
    return out
