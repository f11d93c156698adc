"""TOML recipes onto torchtitan's ``Trainer.Config`` by field path: each key checked to be a field, each value
parsed by tyro (as on the CLI, ``__post_init__`` checks included), one :class:`RecipeError` naming key and
file. TOML has no null: ``"none"`` sets an optional field to None. docs/torchtitan.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import io
import os
import re
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.validate import Validator
from torchtitan.config.manager import ConfigManager, custom_registry
from torchtitan.distributed import ParallelDims
from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataLoader
from torchtitan.models.common.attention import FusedQKVLinear, QKVLinear
from torchtitan.models.common.config_utils import decoder_vocab_size
from torchtitan.models.common.linear import Linear
from torchtitan.models.llama3 import _LINEAR_INIT
from torchtitan.trainer import Trainer
from tyro import _errors as tyro_errors  # parse failures as events, not printed text (private: pyproject pins tyro)
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec

from dist_marsm.titan import corpus, cpu_shims, moe
from dist_marsm.titan.checkpoint import VerifiedCheckpointManager
from dist_marsm.titan.metrics import MARSMMetricsProcessor
from dist_marsm.titan.optimizer_container import MARSMOptimizersContainer

corpus.register_datasets()
moe.register_flavors()
# torchtitan's tyro rules for the recipe's values, but a TOML list of strings: one argument per item (last rule first)
_RECIPE_RULES = ConstructorRegistry()
ConfigManager.register_tyro_rules(_RECIPE_RULES)
_RECIPE_RULES.primitive_rule(
    lambda info: (
        None
        if info.type != list[str]
        else PrimitiveConstructorSpec(
            nargs="*",
            metavar="STR ...",
            instance_from_str=list,
            is_instance=lambda x: isinstance(x, list),
            str_from_instance=list,
        )
    )
)


class RecipeError(ValueError):
    """A recipe problem: the message names the file (or override) and the [section] key."""


@dataclass(kw_only=True, slots=True)
class JobConfig:
    description: str = ""  # free text, logged at start
    local_ranks: int = 2  # ranks `python -m dist_marsm.train` starts itself when not under torchrun (local job)
    threads_per_rank: int = 0  # torch.set_num_threads per rank; 0 leaves torch's default


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name: str = "llama3"  # torchtitan model module (torchtitan.models.<name>)
    flavor: str = "debugmodel"  # model flavor in that module's registry (debugmodel, 8B, 70B, ...)
    attn_backend: Literal["flex", "flex_flash", "varlen"] = "flex"  # on GPUs (CPUs: causal SDPA, see cpu_shims)
    fuse_qkv: bool = True  # llama3: one fused wqkv weight (one matrix); false: wq, wk, wv (three matrices)

    def spec(self):
        try:
            module = importlib.import_module(f"torchtitan.models.{self.name}")
            registry, flavors = module.model_registry, getattr(module, f"{self.name}_configs", None)
        except (ImportError, AttributeError):
            raise ValueError(f"[model] name {self.name!r} is not a torchtitan model with a model_registry") from None
        if flavors is not None and self.flavor not in flavors:
            raise ValueError(f"[model] flavor must be one of {list(flavors)}, got {self.flavor!r}")
        if not self.fuse_qkv and self.name != "llama3":
            raise ValueError("[model] fuse_qkv = false is only supported for llama3")
        spec = registry(self.flavor, attn_backend=self.attn_backend)
        if not self.fuse_qkv:
            unfuse_qkv(spec.model)
        return spec


def unfuse_qkv(model_config) -> None:
    """llama3's fused wqkv projection configs -> separate wq, wk, wv (same blocks, same init)."""

    def separate(cfg):  # QKVLinear builds both wk and wv from the one wkv config
        rows = {"wq": cfg.n_heads * cfg.head_dim, "wkv": cfg.n_kv_heads * cfg.head_dim}
        return QKVLinear.Config(
            head_dim=cfg.head_dim,
            **{
                key: Linear.Config(in_features=cfg.wqkv.in_features, out_features=n, param_init=_LINEAR_INIT)
                for key, n in rows.items()
            },
        )

    return cpu_shims.replace_configs(model_config, FusedQKVLinear.Config, separate)


_AC = typing.get_type_hints(Trainer.Config, include_extras=True)["activation_checkpoint"]
_STATES = {"optimizer", "lr_scheduler", "dataloader", "train_state"}
# Limits torchtitan's own configs do not check (its __post_init__ checks run too).
LIMITS = {
    ("job", "local_ranks"): (lambda v: 1 <= v <= 64, "in [1, 64]"),
    ("job", "threads_per_rank"): (lambda v: v >= 0, ">= 0"),
    **{("training", k): (lambda v: v > 0, "> 0") for k in ("steps", "local_batch_size", "max_norm")},
    ("training", "seq_len"): (lambda v: v >= 2, ">= 2"),
    ("training", "global_batch_size"): (lambda v: v == -1 or v > 0, "-1 or > 0"),
    ("parallelism", "data_parallel_shard_degree"): (lambda v: v == -1 or v >= 1, "-1 or >= 1"),
    **{
        ("parallelism", f"{k}_degree"): (lambda v: v >= 1, ">= 1")
        for k in ("data_parallel_replicate", "tensor_parallel", "pipeline_parallel", "context_parallel")
    },
    ("lr_scheduler", "warmup_steps"): (lambda v: v >= 0, ">= 0"),
    ("lr_scheduler", "min_lr_factor"): (lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lr_scheduler", "decay_ratio"): (lambda v: v is None or 0 <= v <= 1, "in [0, 1] or none"),
    ("checkpoint", "load_step"): (lambda v: v >= -1, ">= -1"),
    ("checkpoint", "exclude_from_loading"): (lambda v: set(v) <= _STATES, f"a subset of {sorted(_STATES)}"),
    ("metrics", "log_freq"): (lambda v: v > 0, "> 0"),
    ("metrics", "jsonl_file"): (lambda v: os.sep not in v, "a file name inside dump_folder"),
}


@dataclass(kw_only=True, slots=True)
class MARSMTrainerConfig(Trainer.Config):
    """torchtitan's config with MARS-M's optimizer and metrics, ``[model]`` by name, ``[job]``, the corpus."""

    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dump_folder: Annotated[str, tyro.conf.arg(aliases=("--job.dump-folder",))] = "./outputs"  # metrics, checkpoints
    hf_assets_path: str = "embedded"  # tokenizer/HF assets folder, or 'embedded': a BPE built from pydoc_data.topics
    optimizer: MARSMOptimizersContainer.Config = field(default_factory=MARSMOptimizersContainer.Config)
    metrics: MARSMMetricsProcessor.Config = field(default_factory=MARSMMetricsProcessor.Config)
    dataloader: HuggingFaceTextDataLoader.Config = field(
        default_factory=lambda: HuggingFaceTextDataLoader.Config(dataset=corpus.TRAIN_DATASET)
    )
    validator: Validator.Config = field(
        default_factory=lambda: Validator.Config(
            enable=False, steps=4, dataloader=HuggingFaceTextDataLoader.Config(dataset=corpus.VALIDATION_DATASET)
        )
    )
    activation_checkpoint: _AC = None
    checkpoint: VerifiedCheckpointManager.Config = field(
        default_factory=lambda: VerifiedCheckpointManager.Config(last_save_model_only=False)
    )

    def __post_init__(self):
        for (section, key), (ok, expect) in LIMITS.items():
            if not ok(value := getattr(getattr(self, section), key)):
                raise ValueError(f"[{section}] {key} must be {expect}, got {value!r}")
        warmup, total = self.lr_scheduler.warmup_steps, self.lr_scheduler.total_steps or self.training.steps
        if warmup >= total:  # torchtitan's scheduler fails a step after warm-up == steps
            raise ValueError(
                f"[lr_scheduler] warmup_steps ({warmup}) must be < [training] steps ({total}): the "
                "schedule needs at least one step after warm-up"
            )
        for name, loader in (("[dataloader]", self.dataloader), ("[validator.dataloader]", self.validator.dataloader)):
            if (name == "[dataloader]" or self.validator.enable) and loader.dataset not in DATASETS:
                raise ValueError(f"{name} dataset must be one of {sorted(DATASETS)}, got {loader.dataset!r}")
        if self.validator.enable and self.validator.dataloader.dataset == self.dataloader.dataset:
            raise ValueError(
                f"[validator.dataloader] dataset must differ from [dataloader] dataset ({self.dataloader.dataset!r})"
            )
        self.model_spec = self.model.spec()
        self.loss = ChunkedLossWrapper.Config(
            loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(self.model_spec))
        )
        on_cpu = cpu_shims.needs_cpu_shims()
        # torchtitan rejects pipeline parallelism with CUDA graphs when the config is built; CPUs have none.
        self.training.disable_cuda_graphs |= self.parallelism.pipeline_parallel_degree > 1 or on_cpu
        Trainer.Config.__post_init__(self)
        if on_cpu:
            cpu_shims.adapt_trainer_config(self)


# ----------------------------------------------------------------------------- TOML and CLI through tyro
def _label(flag: str) -> str:
    *section, key = flag.removeprefix("--").split(".")
    return f"[{'.'.join(section)}] {key}" if section else key


def _bare(ann):  # without Annotated's metadata
    return _bare(typing.get_args(ann)[0]) if typing.get_origin(ann) is Annotated else ann


def _fields(config) -> tuple[dict, list[str]]:
    """A config's type hints, and the fields a recipe or the command line may set."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    return hints, [f.name for f in dataclasses.fields(config) if f.init and "Suppress" not in repr(hints[f.name])]


def _recipe_args(config, table: dict, where: str, path: tuple = ()) -> tuple[list[str], list[str]]:
    """A recipe's values as tyro arguments (options, then subcommands), each key checked to be a field."""
    hints, known = _fields(config)
    options, subcommands = [], []
    for key, raw in table.items():
        flag = ".".join((*path, key))
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            name = f"section [{key}]" if not path and isinstance(raw, dict) else f"key {_label(flag)}"
            raise RecipeError(
                f"{where}: unknown {name}" + (f"; did you mean {', '.join(close)}?" if close else f"; known: {known}")
            )
        current, members = getattr(config, key), [_bare(m) for m in typing.get_args(_bare(hints[key]))]
        named_config = isinstance(raw, str) and any(map(dataclasses.is_dataclass, members))  # activation_checkpoint
        if isinstance(raw, dict) != dataclasses.is_dataclass(current) and not named_config:
            raise RecipeError(
                f"{where}: {_label(flag)} must be "
                + ("a table" if dataclasses.is_dataclass(current) else "a value, not a table")
            )
        if isinstance(raw, dict):
            more, subs = _recipe_args(current, raw, where, (*path, key))
            options, subcommands = options + more, subcommands + subs
        elif named_config:
            subcommands.append(f"{flag}:{raw}")
        elif raw == "none" and type(None) in members:  # TOML has no null
            options.append(f"--{flag}=None")
        elif current is not None and (
            isinstance(raw, list) != isinstance(current, (list, tuple))
            or isinstance(raw, str) != isinstance(current, str)
        ):
            raise RecipeError(f"{where}: {_label(flag)} must be {type(current).__name__}, got {raw!r}")
        else:
            tokens = [
                str(x).capitalize() if isinstance(x, bool) else str(x)
                for x in (raw if isinstance(raw, list) else [raw])
            ]
            if isinstance(raw, list) and any(re.match(r"-(?![\d.])", t) for t in tokens):
                raise RecipeError(f"{where}: {_label(flag)}: a list item may not start with '-', got {raw!r}")
            options += [f"--{flag}", *tokens] if isinstance(raw, list) else [f"--{flag}={tokens[0]}"]
    return options, subcommands


def _parse(default, args: list[str], where: str, prog: str, overrides: bool):
    """``tyro.cli`` over ``default``; a failure raises one RecipeError naming the key (and the override)."""
    if overrides:  # torchtitan's CLI rules (comma lists); booleans as in TOML
        ConfigManager()
        args = [re.sub(r"(^|=)(true|false)$", lambda m: m[1] + m[2].capitalize(), a) for a in args]
    cli = {
        "args": args,
        "default": default,
        "prog": prog,
        "config": (tyro.conf.FlagConversionOff,),
        "registry": custom_registry if overrides else _RECIPE_RULES,
    }
    if "--help" in args or "-h" in args:
        return tyro.cli(type(default), **cli)
    text, failures = io.StringIO(), []  # tyro's events, each with the exception tyro was handling when it failed
    given = {a[2:].split("=")[0].replace("-", "_"): a.split("=")[0] for a in args if a.startswith("--")}
    try:
        with (
            tyro_errors.on_parse_error(lambda event: failures.append((event, sys.exc_info()[1]))),
            contextlib.redirect_stderr(text),
            contextlib.redirect_stdout(text),
        ):
            config = tyro.cli(type(default), **cli)
        sys.stderr.write(text.getvalue())  # what torchtitan's configs printed while being built
        return config
    except SystemExit:  # tyro told the hook, then printed its box into text (the argparse backend: only that)
        key, reason = _reason(*failures[-1], default, given) if failures else (None, " ".join(text.getvalue().split()))
    except (ValueError, TypeError) as e:
        key, reason = None, str(e)
    said = f"override {given.get(key, ' '.join(args))}: " if overrides else ""
    raise RecipeError(f"{where}: {said}{reason}")


def _reason(event, handling, config, given: dict) -> tuple[str | None, str]:
    """The dotted key at fault (None: no one key) and what is wrong, from tyro's event, not its printed text."""
    arg = getattr(event, "argument", None)
    key = arg and ".".join(filter(None, (arg.extern_prefix, arg.field.intern_name))).replace("-", "_")
    message = " ".join(str(getattr(event, "message", type(event).__name__)).split())
    if isinstance(event, tyro_errors.UnrecognizedArgs):
        return _unknown(config, event.tokens)
    if isinstance(event, tyro_errors.InvalidChoice):
        return key, f"{_label(key)} must be one of {tuple(arg.lowered.choices)}, got {event.value!r}"
    if isinstance(event, tyro_errors.BadValue):
        return key, f"{_label(key)}: " + (
            "takes no value" if event.reason == "fixed" else f"needs {arg.lowered.nargs} value(s)"
        )
    if key:  # a value tyro could not convert; the metavar is the type it wanted
        return key, f"{_label(key)} must be {arg.lowered.metavar}: {message}"
    # A section's own check (__post_init__): tyro was handling an exception whose ``arg`` is the section; the
    # root config's check names its keys itself.
    if not isinstance(section := getattr(handling, "arg", None), str):
        return None, message
    keys = [k for k in given if k.rpartition(".")[0] == section]  # the key the check names, else the keys set there
    key = next((k for k in keys if message.startswith(k.rpartition(".")[2] + " ")), None)
    names = "" if key or not keys else ", ".join(k.rpartition(".")[2] for k in keys) + ": "
    return key or (keys or [None])[0], f"[{section}] {names}{message}"


def _unknown(config, tokens: list[str]) -> tuple[str | None, str]:
    """Tokens tyro did not take: an unknown flag with the nearest known ones, or a named config with the choices."""
    token = next((t for t in tokens if t.startswith("--") or ":" in t), None)
    if token is None:
        return None, f"unexpected {' '.join(tokens)}"
    path = token.removeprefix("--").split("=")[0].split(":")[0].replace("-", "_").split(".")
    for depth, part in enumerate(path):  # noqa: B007 - depth is read after the loop: how far the walk got
        hints, known = _fields(config)
        if part not in known or not dataclasses.is_dataclass(config := getattr(config, part)):
            break
    if ":" in token:  # tyro spells a named config (a subcommand) field-with-dashes:name
        return None, f"unknown {token}; choices: " + ", ".join(
            f"{part.replace('_', '-')}:{m.name}"
            for a in typing.get_args(_bare(hints.get(part)))
            for m in typing.get_args(a)[1:]
            if hasattr(m, "name")
        )
    close = ", ".join("--" + ".".join((*path[:depth], c)) for c in difflib.get_close_matches(part, known, cutoff=0.6))
    key = ".".join(path)
    return key, f"{_label(key)}: unknown {token}; " + (f"did you mean {close}?" if close else f"known: {known}")


# ----------------------------------------------------------------------------- entry
def load_recipe(
    path: str,
    overrides: list[str] | None = None,
    world_size: int | None = None,
    prog: str = "python -m dist_marsm.train",
) -> MARSMTrainerConfig:
    """Read a recipe, apply CLI overrides and check it. Raises :class:`RecipeError` naming key and file."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory; --recipe takes a .toml file (see recipes/)") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    config = MARSMTrainerConfig(hf_assets_path="./")
    options, subcommands = _recipe_args(config, table, path)
    for args, override in ((options + subcommands, False), (list(overrides or []), True)):
        config = _parse(config, args, path, prog, override) if args else config
    if config.hf_assets_path == "embedded":
        config.hf_assets_path = corpus.tokenizer_dir(config.model_spec.model.vocab_size)
    if world_size is not None:
        check_world_size(config, world_size, path)
    return config


def check_world_size(config, world: int, where: str) -> None:
    """torchtitan's own check of the parallelism degrees against the job's ranks, before any rank starts."""
    try:
        ParallelDims.from_config(config.parallelism, world)
    except AssertionError as e:
        raise RecipeError(
            f"{where}: [parallelism] {str(e) or 'the degrees do not fit'} (the job has {world} ranks)"
        ) from None
