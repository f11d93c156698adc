"""TOML recipes -> torchtitan 0.3.0 ``Trainer.Config``.

A recipe has torchtitan's familiar sections: [job] [model] [training] [parallelism] [optimizer]
[lr_scheduler] [checkpoint] [metrics]. Every key is declared in :data:`SCHEMA` (type, default,
allowed values, one line of help); ``docs/torchtitan.md`` has the table. :func:`load_recipe` reads
the file, applies ``--section.key value`` overrides (parsed with the key's declared type) and
checks everything - unknown sections/keys, wrong types, impossible values and impossible
combinations raise one :class:`RecipeError` naming the key and the file - before anything is built.
:func:`to_trainer_config` then builds the torchtitan config; on a CPU-only machine it also applies
:mod:`dist_marsm.titan.cpu_shims`.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from dist_marsm.mars_math import LR_ADJUST_MODES
from dist_marsm.optimizer import NONFINITE_POLICIES, VARIANTS
from dist_marsm.owner_plan import OWNER_POLICIES

OPTIMIZER_NAMES = ("MARS-M", "AdamW", "DistMuon")
NONE = "none"  # TOML has no null: optional keys take the string "none"


class RecipeError(ValueError):
    """A recipe problem: the message names the file (or override) and the [section] key."""


# ----------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Key:
    type: str                     # int | float | bool | str | list[float] | list[str]
    default: Any
    doc: str
    choices: tuple | None = None  # allowed values (str keys)
    check: Callable[[Any], bool] | None = None
    check_doc: str = ""
    optional: bool = False        # the string "none" means "not set" (None)


def _positive(v):
    return v > 0


def _nonneg(v):
    return v >= 0


def _unit_open(v):
    return 0 <= v < 1


def _unit_closed(v):
    return 0 <= v <= 1


def _regexes(v):
    try:
        for p in v:
            re.compile(p)
    except re.error:
        return False
    return True


def K(type_, default, doc, **kw) -> Key:  # noqa: N802 - a tiny table constructor
    return Key(type_, default, doc, **kw)


SCHEMA: dict[str, dict[str, Key]] = {
    "job": {
        "description": K("str", "", "free text, logged at start"),
        "dump_folder": K("str", "./outputs", "all outputs: metrics.jsonl, loss_curve.png, checkpoints, tb"),
        "local_ranks": K("int", 2, "ranks started by `python -m dist_marsm.train` when not under torchrun "
                         "(CPU/gloo local job)", check=lambda v: 1 <= v <= 64, check_doc="in [1, 64]"),
        "threads_per_rank": K("int", 0, "torch.set_num_threads per rank; 0 leaves torch's default",
                              check=_nonneg, check_doc=">= 0"),
        "print_config": K("bool", False, "log the full torchtitan config at start"),
    },
    "model": {
        "name": K("str", "llama3", "torchtitan model module (torchtitan.models.<name>)"),
        "flavor": K("str", "debugmodel", "model flavor in that module's registry (debugmodel, 8B, 70B, ...)"),
        "attn_backend": K("str", "flex", "attention on GPUs (on CPU: causal SDPA, see cpu_shims)",
                          choices=("flex", "flex_flash", "varlen")),
        "fuse_qkv": K("bool", True, "llama3: one fused wqkv weight (orthogonalized as one matrix); false = "
                      "separate wq, wk, wv weights (three matrices); same function and init distribution"),
        "hf_assets_path": K("str", "embedded", "tokenizer/HF assets folder, or 'embedded': the BPE built "
                            "locally from pydoc_data.topics with the model's vocabulary size"),
    },
    "training": {
        "steps": K("int", 100, "optimizer steps", check=_positive, check_doc="> 0"),
        "local_batch_size": K("int", 8, "sequences per data-parallel rank per micro step", check=_positive,
                              check_doc="> 0"),
        "global_batch_size": K("int", -1, "-1: local_batch_size x data-parallel degree (no accumulation)",
                               check=lambda v: v == -1 or v > 0, check_doc="-1 or > 0"),
        "seq_len": K("int", 2048, "tokens per sequence", check=lambda v: v >= 2, check_doc=">= 2"),
        "max_norm": K("float", 1.0, "global gradient-norm clipping before the optimizer", check=_positive,
                      check_doc="> 0"),
        "dtype": K("str", "float32", "parameter/optimizer-state dtype", choices=("float32", "bfloat16")),
        "mixed_precision_param": K("str", "bfloat16", "FSDP compute dtype (use float32 on CPU: bf16 is ~9x "
                                   "slower there)", choices=("float32", "bfloat16")),
        "dataset": K("str", "pydoc_topics", "torchtitan dataset name: pydoc_topics (embedded), c4, c4_test, ..."),
        "dataset_path": K("str", None, "local path/HF id for the dataset, 'none' for the default", optional=True),
        "activation_checkpoint": K("str", "none", "activation checkpointing",
                                   choices=("none", "selective", "full")),
        "compile": K("bool", False, "torch.compile the model blocks"),
        "seed": K("int", 0, "random seed (model init, data order)", optional=True),
        "deterministic": K("bool", False, "deterministic algorithms (slower)"),
        "gc_freq": K("int", 50, "Python GC every N steps", check=_positive, check_doc="> 0"),
        "validation_freq": K("int", 0, "validation every N steps on the held-out split; 0 = off",
                             check=_nonneg, check_doc=">= 0"),
        "validation_steps": K("int", 4, "batches per validation", check=_positive, check_doc="> 0"),
        "validation_dataset": K("str", "pydoc_topics_validation", "dataset used for validation"),
    },
    "parallelism": {
        "data_parallel_shard_degree": K("int", -1, "FSDP degree; -1 = all remaining ranks",
                                        check=lambda v: v == -1 or v >= 1, check_doc="-1 or >= 1"),
        "data_parallel_replicate_degree": K("int", 1, "HSDP replicas", check=_positive, check_doc=">= 1"),
        "tensor_parallel_degree": K("int", 1, "TP degree", check=_positive, check_doc=">= 1"),
        "pipeline_parallel_degree": K("int", 1, "PP degree (one optimizer per stage)", check=_positive,
                                      check_doc=">= 1"),
        "pipeline_parallel_schedule": K("str", "1F1B", "torchtitan PP schedule name"),
        "pipeline_parallel_microbatch_size": K("int", 1, "PP microbatch size", check=_positive, check_doc=">= 1"),
        "context_parallel_degree": K("int", 1, "CP degree", check=_positive, check_doc=">= 1"),
        "enable_sequence_parallel": K("bool", True, "sequence parallel with TP"),
        "fsdp_reshard_after_forward": K("str", "default", "FSDP reshard policy",
                                        choices=("default", "always", "never")),
        "spmd_backend": K("str", "partial_dtensor", "torchtitan SPMD backend; MARS-M reads DTensor placements "
                          "(partial_dtensor: classic FSDP2 DTensors)",
                          choices=("partial_dtensor", "full_dtensor", "spmd_types")),
    },
    "optimizer": {
        "name": K("str", "MARS-M", "which optimizer", choices=OPTIMIZER_NAMES),
        "lr": K("float", 3e-3, "peak learning rate (all optimizers)", check=_positive, check_doc="> 0"),
        "weight_decay": K("float", 0.1, "decoupled weight decay (all optimizers)", check=_nonneg,
                          check_doc=">= 0"),
        "momentum": K("float", 0.95, "MARS-M/DistMuon momentum beta", check=_unit_open, check_doc="in [0, 1)"),
        "gamma": K("float", 0.025, "MARS-M variance-reduction scale (0 = Moonlight Muon)", check=_unit_closed,
                   check_doc="in [0, 1]"),
        "variant": K("str", "approx", "MARS-M variant ('exact' needs a closure torchtitan does not give)",
                     choices=tuple(v for v in VARIANTS if v != "exact")),
        "ns_steps": K("int", 5, "Newton-Schulz iterations (MARS-M, DistMuon)",
                      check=lambda v: 1 <= v <= 99, check_doc="in [1, 99]"),
        "ns_dtype": K("str", "bfloat16", "MARS-M Newton-Schulz compute dtype", choices=("bfloat16", "float32")),
        "clip": K("bool", True, "MARS-M: clip the corrected gradient to unit Frobenius norm"),
        "lr_adjust": K("str", "moonlight", "update scale: moonlight 0.2*sqrt(max(A,B)) (DistMuon: "
                       "match_rms_adamw), original sqrt(max(1,A/B)), none", choices=LR_ADJUST_MODES),
        "normalize": K("str", NONE, "MARS-M: 'neuron' = NorMuon row normalization, 'none'",
                       choices=(NONE, "neuron")),
        "nesterov": K("bool", True, "DistMuon only: Nesterov momentum"),
        "adamw_lr": K("float", None, "lr of the AdamW route (embeddings, head, vectors); 'none' = lr",
                      optional=True, check=_positive, check_doc="> 0"),
        "adamw_betas": K("list[float]", [0.9, 0.95], "AdamW betas (AdamW route, and the AdamW optimizer)",
                         check=lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                         check_doc="two numbers in [0, 1)"),
        "adamw_eps": K("float", 1e-8, "AdamW epsilon", check=_nonneg, check_doc=">= 0"),
        "adamw_patterns": K("list[str]", [], "extra regexes (canonical parameter names) sent to the AdamW "
                            "route, besides embeddings, the output head and ndim<2",
                            check=_regexes, check_doc="valid regular expressions"),
        "implementation": K("str", "foreach", "AdamW implementation", choices=("for-loop", "foreach", "fused")),
        "bucket_mb": K("float", 64.0, "MARS-M: full-matrix MB per communication bucket", check=_positive,
                       check_doc="> 0"),
        "wire_dtype": K("str", "bfloat16", "MARS-M: dtype of momentum/results between ranks",
                        choices=("bfloat16", "float32")),
        "owner_policy": K("str", "largest_first", "MARS-M: which rank orthogonalizes which matrix",
                          choices=OWNER_POLICIES),
        "nonfinite": K("str", "raise", "MARS-M: on inf/NaN gradients raise, or skip the step on all ranks",
                       choices=NONFINITE_POLICIES),
    },
    "lr_scheduler": {
        "warmup_steps": K("int", 200, "linear warm-up steps", check=_nonneg, check_doc=">= 0"),
        "decay_ratio": K("float", None, "fraction of steps spent decaying at the end; 'none' = all after "
                         "warm-up", optional=True, check=_unit_closed, check_doc="in [0, 1]"),
        "decay_type": K("str", "cosine", "decay shape", choices=("linear", "sqrt", "cosine")),
        "min_lr_factor": K("float", 0.0, "final lr / peak lr", check=_unit_closed, check_doc="in [0, 1]"),
    },
    "checkpoint": {
        "enable": K("bool", False, "save checkpoints (torchtitan CheckpointManager, DCP); resumes "
                    "automatically from the latest complete one in <dump_folder>/<folder>"),
        "folder": K("str", "checkpoint", "checkpoint folder inside dump_folder"),
        "interval": K("int", 500, "save every N steps (and at the last step)", check=_positive,
                      check_doc="> 0"),
        "keep_latest_k": K("int", 10, "keep only the newest k checkpoints (0 = all)",
                           check=lambda v: v == 0 or v >= 2, check_doc="0 or >= 2"),
        "last_save_model_only": K("bool", False, "final checkpoint without optimizer state"),
        "load_step": K("int", -1, "resume from this step; -1 = latest", check=lambda v: v >= -1,
                       check_doc=">= -1"),
        "initial_load_path": K("str", None, "checkpoint to initialize from when dump_folder has none",
                               optional=True),
        "async_mode": K("str", "disabled", "DCP async save", choices=("disabled", "async",
                                                                       "async_with_pinned_mem")),
        "exclude_from_loading": K("list[str]", [], "parts not restored on resume (optimizer, lr_scheduler, "
                                  "dataloader, train_state); resuming at another data-parallel degree needs "
                                  "[\"dataloader\"]",
                                  check=lambda v: set(v) <= {"optimizer", "lr_scheduler", "dataloader", "train_state"},
                                  check_doc="a subset of optimizer, lr_scheduler, dataloader, train_state"),
    },
    "metrics": {
        "log_freq": K("int", 1, "log (and append to metrics.jsonl) every N steps", check=_positive,
                      check_doc="> 0"),
        "jsonl_file": K("str", "metrics.jsonl", "per-step JSON lines in dump_folder (rank 0); '' = off"),
        "plot_file": K("str", "loss_curve.png", "loss curve written at the end (rank 0); '' = off"),
        "output_norm": K("bool", True, "log the output layer's RMS->inf operator norm"),
        "enable_tensorboard": K("bool", False, "torchtitan TensorBoard logging"),
        "enable_wandb": K("bool", False, "torchtitan Weights & Biases logging"),
        "disable_color_printing": K("bool", False, "plain log lines"),
    },
}

# Which [optimizer] keys each optimizer reads (the others are accepted and ignored, so that one
# recipe can compare optimizers with --optimizer.name).
OPTIMIZER_KEYS = {
    "MARS-M": ("lr", "weight_decay", "momentum", "gamma", "variant", "ns_steps", "ns_dtype", "clip", "lr_adjust",
               "normalize", "adamw_lr", "adamw_betas", "adamw_eps", "adamw_patterns", "bucket_mb", "wire_dtype",
               "owner_policy", "nonfinite"),
    "AdamW": ("lr", "weight_decay", "adamw_betas", "adamw_eps", "implementation"),
    "DistMuon": ("lr", "weight_decay", "momentum", "ns_steps", "nesterov", "lr_adjust", "adamw_lr",
                 "adamw_betas", "adamw_eps", "adamw_patterns", "implementation"),
}


# ----------------------------------------------------------------------------- values
@dataclass
class Recipe:
    """A fully checked recipe: every schema key has a value (the recipe's, an override's or the default)."""

    path: str
    values: dict[str, dict[str, Any]]
    given: set = field(default_factory=set)      # (section, key) set by the file or an override

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    @property
    def dump_folder(self) -> str:
        return self.values["job"]["dump_folder"]

    def parallel_degree_product(self) -> int | None:
        p = self.values["parallelism"]
        if p["data_parallel_shard_degree"] == -1:
            return None
        return (p["data_parallel_shard_degree"] * p["data_parallel_replicate_degree"] * p["tensor_parallel_degree"]
                * p["pipeline_parallel_degree"] * p["context_parallel_degree"])


def _type_ok(key: Key, v: Any) -> tuple[bool, Any]:
    """(ok, normalized value) for a TOML-typed value."""
    t = key.type
    if key.optional and isinstance(v, str) and v.lower() == NONE and t != "str":
        return True, None
    if key.optional and t == "str" and v == NONE:
        return True, None
    if t == "int":
        return (isinstance(v, int) and not isinstance(v, bool)), v
    if t == "float":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return ok, float(v) if ok else v
    if t == "bool":
        return isinstance(v, bool), v
    if t == "str":
        return isinstance(v, str), v
    if t == "list[float]":
        ok = isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        return ok, [float(x) for x in v] if ok else v
    if t == "list[str]":
        return isinstance(v, list) and all(isinstance(x, str) for x in v), v
    raise AssertionError(t)


def _type_name(key: Key) -> str:
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "list[float]": "a list of numbers", "list[str]": "a list of strings"}
    return names[key.type] + (" (or \"none\")" if key.optional else "")


def _check_value(where: str, section: str, name: str, key: Key, raw: Any) -> Any:
    ok, v = _type_ok(key, raw)
    if not ok:
        raise RecipeError(f"{where}: [{section}] {name} must be {_type_name(key)}, got {raw!r} "
                          f"({type(raw).__name__})")
    if v is None:
        return None
    if key.choices is not None and v not in key.choices:
        raise RecipeError(f"{where}: [{section}] {name} must be one of {list(key.choices)}, got {v!r}")
    if key.check is not None and not key.check(v):
        raise RecipeError(f"{where}: [{section}] {name} must be {key.check_doc}, got {v!r}")
    return v


def _parse_override_value(key: Key, raw: str) -> Any:
    """An override's text -> a value of the key's declared type (then checked like a recipe value)."""
    text = raw.strip()
    if key.optional and text.lower() == NONE:
        return NONE
    t = key.type
    if t == "str":
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return text[1:-1]
        return raw
    if t == "bool":
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        return raw
    if t in ("int", "float"):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            try:
                return float(text) if t == "float" else raw
            except ValueError:
                return raw
    if t.startswith("list["):
        if text.startswith("["):
            try:
                return tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                return raw
        parts = [p.strip() for p in text.split(",")] if text else []
        if t == "list[str]":
            return parts
        try:
            return [float(p) for p in parts]
        except ValueError:
            return raw
    raise AssertionError(t)


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """``--section.key value`` / ``--section.key=value`` -> [(section, key, text)]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise RecipeError(f"override {arg!r}: expected --section.key value")
        if "=" in arg:
            name, text = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise RecipeError(f"override {arg}: missing value")
            name, text = arg[2:], args[i + 1]
            i += 1
        section, _, key = name.partition(".")
        out.append((section, key, text))
        i += 1
    return out


def load_recipe(path: str, overrides: list[str] | None = None, world_size: int | None = None) -> Recipe:
    """Read, override and check a recipe. Raises :class:`RecipeError` naming the key and file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    values = {s: {k: (list(key.default) if isinstance(key.default, list) else key.default)
                  for k, key in keys.items()} for s, keys in SCHEMA.items()}
    given = set()
    for section, table in data.items():
        if section not in SCHEMA:
            raise RecipeError(f"{path}: unknown section [{section}]; known sections: {list(SCHEMA)}")
        if not isinstance(table, dict):
            raise RecipeError(f"{path}: [{section}] must be a table, got {table!r}")
        for name, raw in table.items():
            if name not in SCHEMA[section]:
                raise RecipeError(f"{path}: unknown key [{section}] {name}; known keys: {list(SCHEMA[section])}")
            values[section][name] = _check_value(path, section, name, SCHEMA[section][name], raw)
            given.add((section, name))
    for section, name, text in parse_overrides(list(overrides or [])):
        where = f"{path}: override --{section}.{name}"
        if section not in SCHEMA:
            raise RecipeError(f"{where}: unknown section [{section}]; known sections: {list(SCHEMA)}")
        if name not in SCHEMA[section]:
            raise RecipeError(f"{where}: unknown key [{section}] {name}; known keys: {list(SCHEMA[section])}")
        key = SCHEMA[section][name]
        values[section][name] = _check_value(where, section, name, key, _parse_override_value(key, text))
        given.add((section, name))
    recipe = Recipe(path=path, values=values, given=given)
    _check_combinations(recipe, world_size)
    return recipe


def _check_combinations(r: Recipe, world_size: int | None) -> None:
    path, o = r.path, r["optimizer"]
    if o["name"] == "DistMuon" and o["lr_adjust"] == "none":
        raise RecipeError(f"{path}: [optimizer] lr_adjust 'none' has no DistMuon equivalent "
                          "(use 'moonlight' = match_rms_adamw, or 'original')")
    t, ls = r["training"], r["lr_scheduler"]
    if ("lr_scheduler", "warmup_steps") in r.given and ls["warmup_steps"] > t["steps"]:
        raise RecipeError(f"{path}: [lr_scheduler] warmup_steps ({ls['warmup_steps']}) must be <= "
                          f"[training] steps ({t['steps']})")
    if t["validation_freq"] and t["validation_dataset"] == t["dataset"]:
        raise RecipeError(f"{path}: [training] validation_dataset must differ from dataset ({t['dataset']!r})")
    p = r["parallelism"]
    if p["pipeline_parallel_degree"] > 1 and t["local_batch_size"] % p["pipeline_parallel_microbatch_size"]:
        raise RecipeError(f"{path}: [training] local_batch_size ({t['local_batch_size']}) must be divisible by "
                          f"[parallelism] pipeline_parallel_microbatch_size "
                          f"({p['pipeline_parallel_microbatch_size']})")
    if world_size is not None:
        product = r.parallel_degree_product()
        others = (p["data_parallel_replicate_degree"] * p["tensor_parallel_degree"]
                  * p["pipeline_parallel_degree"] * p["context_parallel_degree"])
        if product is not None and product != world_size:
            raise RecipeError(f"{path}: [parallelism] degrees multiply to {product}, but the job has "
                              f"{world_size} ranks")
        if product is None and world_size % others:
            raise RecipeError(f"{path}: [parallelism] non-FSDP degrees multiply to {others}, which does not "
                              f"divide the job's {world_size} ranks")
    m = r["metrics"]
    for name in ("jsonl_file", "plot_file"):
        if os.sep in m[name]:
            raise RecipeError(f"{path}: [metrics] {name} must be a file name inside dump_folder, got {m[name]!r}")


def ignored_optimizer_keys(r: Recipe) -> list[str]:
    """[optimizer] keys the recipe set that the selected optimizer does not read."""
    used = set(OPTIMIZER_KEYS[r["optimizer"]["name"]]) | {"name"}
    return sorted(k for s, k in r.given if s == "optimizer" and k not in used)


# ----------------------------------------------------------------------------- translation
def optimizer_config(r: Recipe):
    """The torchtitan optimizer container config for [optimizer]."""
    from torchtitan.components.optimizer import ParamGroupConfig

    from dist_marsm.titan.optimizer_container import INSTANCE_KEYS, OPTIMIZER_NAME, MARSMOptimizersContainer

    o = r["optimizer"]
    name = o["name"]
    if name == "MARS-M":
        kwargs = {k: o[k] for k in ("lr", "weight_decay", "momentum", "gamma", "variant", "ns_steps", "ns_dtype",
                                    "clip", "lr_adjust", "adamw_eps")}
        kwargs["normalize"] = None if o["normalize"] == NONE else o["normalize"]
        kwargs["adamw_betas"] = tuple(o["adamw_betas"])
        kwargs["adamw_patterns"] = _adamw_patterns(o)
        if o["adamw_lr"] is not None:
            kwargs["adamw_lr"] = o["adamw_lr"]
        return MARSMOptimizersContainer.Config(
            param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=OPTIMIZER_NAME, optimizer_kwargs=kwargs)],
            optimizer_factory_kwargs_by_name={OPTIMIZER_NAME: {k: o[k] for k in INSTANCE_KEYS}},
        )
    if name == "AdamW":
        kwargs = {"lr": o["lr"], "weight_decay": o["weight_decay"], "betas": tuple(o["adamw_betas"]),
                  "eps": o["adamw_eps"]}
        return MARSMOptimizersContainer.Config(
            implementation=o["implementation"],
            param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs=kwargs)])
    # DistMuon on the matrices MARS-M would orthogonalize; torch AdamW on the rest (routed by the container).
    kwargs = {"lr": o["lr"], "weight_decay": o["weight_decay"], "momentum": o["momentum"], "nesterov": o["nesterov"],
              "ns_steps": o["ns_steps"],
              "adjust_lr_fn": {"moonlight": "match_rms_adamw", "original": "original"}[o["lr_adjust"]],
              "adamw_patterns": _adamw_patterns(o),
              "adamw_kwargs": {"lr": o["adamw_lr"] or o["lr"], "weight_decay": o["weight_decay"],
                               "betas": tuple(o["adamw_betas"]), "eps": o["adamw_eps"]}}
    return MARSMOptimizersContainer.Config(
        implementation=o["implementation"],
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="DistMuon", optimizer_kwargs=kwargs)])


def _adamw_patterns(o: dict) -> tuple[str, ...]:
    from dist_marsm import DEFAULT_ADAMW_PATTERNS

    return tuple(DEFAULT_ADAMW_PATTERNS) + tuple(o["adamw_patterns"])


def model_spec(r: Recipe):
    import importlib

    m = r["model"]
    try:
        module = importlib.import_module(f"torchtitan.models.{m['name']}")
        registry = module.model_registry
    except (ImportError, AttributeError):
        raise RecipeError(f"{r.path}: [model] name {m['name']!r} is not a torchtitan model with a "
                          "model_registry") from None
    flavors = getattr(module, f"{m['name']}_configs", None)
    if flavors is not None and m["flavor"] not in flavors:
        raise RecipeError(f"{r.path}: [model] flavor must be one of {list(flavors)}, got {m['flavor']!r}")
    try:
        spec = registry(m["flavor"], attn_backend=m["attn_backend"])
    except (KeyError, ValueError) as e:
        raise RecipeError(f"{r.path}: [model] {m['name']} {m['flavor']} with attn_backend "
                          f"{m['attn_backend']!r}: {e}") from None
    if not m["fuse_qkv"]:
        if m["name"] != "llama3":
            raise RecipeError(f"{r.path}: [model] fuse_qkv = false is only supported for llama3")
        unfuse_qkv(spec.model)
    return spec


def unfuse_qkv(model_config) -> int:
    """Replace llama3's fused wqkv projection configs by separate wq, wk, wv ones (the same blocks, the same
    truncated-normal(0.02) init as torchtitan's llama3 linears); returns the number replaced."""
    from torchtitan.models.common.attention import FusedQKVLinear, QKVLinear
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.llama3 import _LINEAR_INIT

    found = list(model_config.traverse(FusedQKVLinear.Config))
    for _fqn, cfg, parent, attr in found:
        dim = cfg.wqkv.in_features
        new = QKVLinear.Config(
            head_dim=cfg.head_dim,
            wq=Linear.Config(in_features=dim, out_features=cfg.n_heads * cfg.head_dim, param_init=_LINEAR_INIT),
            # QKVLinear builds both wk and wv from this one config
            wkv=Linear.Config(in_features=dim, out_features=cfg.n_kv_heads * cfg.head_dim, param_init=_LINEAR_INIT))
        if isinstance(attr, int):
            parent[attr] = new
        else:
            setattr(parent, attr, new)
    return len(found)


def to_trainer_config(r: Recipe, apply_cpu_shims: bool | None = None):
    """Build torchtitan's ``Trainer.Config``; with no accelerator (or ``apply_cpu_shims=True``)
    the CPU shims are applied to it."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import LRSchedulersContainer
    from torchtitan.components.validate import Validator
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.config.configs import DebugConfig
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
    from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataLoader
    from torchtitan.models.common.config_utils import decoder_vocab_size

    from dist_marsm.titan import corpus, cpu_shims
    from dist_marsm.titan.metrics import MARSMMetricsProcessor

    corpus.register_datasets()
    on_accelerator = not (apply_cpu_shims or (apply_cpu_shims is None and cpu_shims.needs_cpu_shims()))
    j, m, t, p = r["job"], r["model"], r["training"], r["parallelism"]
    ls, c, mt = r["lr_scheduler"], r["checkpoint"], r["metrics"]
    for key in ("dataset", "validation_dataset"):
        if (key == "dataset" or t["validation_freq"]) and t[key] not in DATASETS:
            raise RecipeError(f"{r.path}: [training] {key} must be one of {sorted(DATASETS)}, got {t[key]!r}")

    spec = model_spec(r)
    assets = m["hf_assets_path"]
    if assets == "embedded":
        assets = corpus.tokenizer_dir(spec.model.vocab_size)
    # A real assets folder is checked by torchtitan when it builds the tokenizer (before any step);
    # not here, so cluster recipes translate on machines without the weights/tokenizer.

    ac = {"none": None, "selective": SelectiveAC.Config(), "full": FullAC.Config()}[t["activation_checkpoint"]]
    config = MARSMTrainerConfig(
        model_spec=spec,
        hf_assets_path=assets,
        dump_folder=j["dump_folder"],
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(spec))),
        optimizer=optimizer_config(r),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=ls["warmup_steps"], decay_ratio=ls["decay_ratio"],
                                                  decay_type=ls["decay_type"], min_lr_factor=ls["min_lr_factor"]),
        training=TrainingConfig(local_batch_size=t["local_batch_size"], global_batch_size=t["global_batch_size"],
                                seq_len=t["seq_len"], max_norm=t["max_norm"], steps=t["steps"], dtype=t["dtype"],
                                mixed_precision_param=t["mixed_precision_param"], gc_freq=t["gc_freq"],
                                # torchtitan rejects pipeline parallelism with CUDA graphs when the config
                                # is built; CPUs have none.
                                disable_cuda_graphs=p["pipeline_parallel_degree"] > 1 or not on_accelerator),
        dataloader=HuggingFaceTextDataLoader.Config(dataset=t["dataset"], dataset_path=t["dataset_path"]),
        parallelism=ParallelismConfig(
            data_parallel_shard_degree=p["data_parallel_shard_degree"],
            data_parallel_replicate_degree=p["data_parallel_replicate_degree"],
            tensor_parallel_degree=p["tensor_parallel_degree"],
            pipeline_parallel_degree=p["pipeline_parallel_degree"],
            pipeline_parallel_schedule=p["pipeline_parallel_schedule"],
            pipeline_parallel_microbatch_size=p["pipeline_parallel_microbatch_size"],
            context_parallel_degree=p["context_parallel_degree"],
            enable_sequence_parallel=p["enable_sequence_parallel"],
            fsdp_reshard_after_forward=p["fsdp_reshard_after_forward"],
            spmd_backend=p["spmd_backend"]),
        checkpoint=CheckpointManager.Config(enable=c["enable"], folder=c["folder"], interval=c["interval"],
                                            keep_latest_k=c["keep_latest_k"],
                                            last_save_model_only=c["last_save_model_only"],
                                            load_step=c["load_step"], initial_load_path=c["initial_load_path"],
                                            async_mode=c["async_mode"],
                                            exclude_from_loading=list(c["exclude_from_loading"])),
        activation_checkpoint=ac,
        compile=CompileConfig(enable=t["compile"]),
        metrics=MARSMMetricsProcessor.Config(log_freq=mt["log_freq"], enable_tensorboard=mt["enable_tensorboard"],
                                             enable_wandb=mt["enable_wandb"],
                                             disable_color_printing=mt["disable_color_printing"],
                                             jsonl_file=mt["jsonl_file"], plot_file=mt["plot_file"],
                                             output_norm=mt["output_norm"]),
        validator=Validator.Config(enable=t["validation_freq"] > 0, freq=max(1, t["validation_freq"]),
                                   steps=t["validation_steps"],
                                   dataloader=HuggingFaceTextDataLoader.Config(dataset=t["validation_dataset"],
                                                                               infinite=True)),
        debug=DebugConfig(seed=t["seed"], deterministic=t["deterministic"], print_config=j["print_config"]),
    )
    if apply_cpu_shims or (apply_cpu_shims is None and cpu_shims.needs_cpu_shims()):
        cpu_shims.adapt_trainer_config(config)
    return config



def MARSMTrainerConfig(**kwargs):  # noqa: N802 - reads like the class it builds
    from dist_marsm.titan.config_registry import MARSMTrainerConfig as cls

    return cls(**kwargs)
