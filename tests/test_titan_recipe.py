"""Recipe validation, overrides, translation of every shipped recipe, MARS-M routing inside torchtitan's
optimizer container, the output-norm definition, the embedded corpus and the CPU shims.

Single process, no Trainer (tests/test_titan_trainer.py runs the real Trainer on spawned ranks).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan")

from _spawn import scenario, scenario_cases, scenario_check  # noqa: E402

from dist_marsm.settings import BY_NAME  # noqa: E402
from dist_marsm.titan.recipe import RecipeError, load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # One tokenizer cache for the whole session (building it takes a few seconds).
    monkeypatch.setenv("DIST_MARSM_CACHE", str(tmp_path_factory.getbasetemp() / "dist_marsm_cache"))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return str(path)


def error_of(path, overrides=None, **kw) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides, **kw)
    return str(info.value)


# ------------------------------------------------------------------ validation errors
def test_unknown_section_names_section_and_file(tmp_path):
    p = write(tmp_path, '[optimiser]\nname = "MARS-M"\n')
    msg = error_of(p)
    assert p in msg and "[optimiser]" in msg and "unknown section" in msg


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "[optimizer]\nlearning_rate = 0.1\n")
    msg = error_of(p)
    assert p in msg and "[optimizer] learning_rate" in msg and "unknown key" in msg


@pytest.mark.parametrize(
    "line,key",
    [
        ('lr = "fast"', "[optimizer] lr"),
        ("ns_steps = 5.0", "[optimizer] ns_steps"),
        ("clip = 1", "[optimizer] clip"),
        ("adamw_betas = 0.9", "[optimizer] adamw_betas"),
        ("momentum = true", "[optimizer] momentum"),
        ('lr = "0.1"', "[optimizer] lr"),
        ("variant = 1", "[optimizer] variant"),
        ("lr = [1, 2]", "[optimizer] lr"),
    ],
)
def test_wrong_type_names_key_and_file(tmp_path, line, key):
    """TOML's own types count: a string where a number belongs (or the reverse) is refused, not converted."""
    p = write(tmp_path, f"[optimizer]\n{line}\n")
    msg = error_of(p)
    assert p in msg and key in msg and "must be" in msg


@pytest.mark.parametrize(
    "section,line,key",
    [
        ("optimizer", "momentum = 1.5", "[optimizer] momentum"),
        ("optimizer", "lr = 0", "[optimizer] lr"),
        ("optimizer", 'variant = "exact"', "[optimizer] variant"),  # needs a closure torchtitan never gives
        ("optimizer", 'name = "SGD"', "[optimizer] name"),
        ("optimizer", "adamw_betas = [0.9, 1.0]", "[optimizer] adamw_betas"),
        ("optimizer", 'adamw_patterns = ["(unclosed"]', "[optimizer] adamw_patterns"),
        ("training", "steps = 0", "[training] steps"),
        ("parallelism", "tensor_parallel_degree = 0", "[parallelism] tensor_parallel_degree"),
        ("lr_scheduler", "min_lr_factor = 2.0", "[lr_scheduler] min_lr_factor"),
        ("checkpoint", "keep_latest_k = 1", "[checkpoint] keep_latest_k"),
    ],
)
def test_impossible_value_names_key_and_file(tmp_path, section, line, key):
    p = write(tmp_path, f"[{section}]\n{line}\n")
    msg = error_of(p)
    assert p in msg and key in msg


def test_impossible_combinations(tmp_path):
    p = write(tmp_path, "[training]\nsteps = 10\n[lr_scheduler]\nwarmup_steps = 20\n")
    assert "[lr_scheduler] warmup_steps" in error_of(p)
    p = write(tmp_path, "[parallelism]\ndata_parallel_shard_degree = 2\ntensor_parallel_degree = 2\n")
    msg = error_of(p, world_size=2)
    assert "[parallelism]" in msg and "dp_shard(2)" in msg and "tp(2)" in msg and "2 ranks" in msg
    load_recipe(p, world_size=4)  # the same recipe fits 4 ranks


def test_nothing_starts_on_a_bad_recipe(tmp_path):
    """The entry point stops before launching anything: exit code 2, one error line naming key and file."""
    p = write(tmp_path, "dump_folder = " + repr(str(tmp_path / "out")) + "\n[optimizer]\nmomentum = 2.0\n")
    out = subprocess.run(
        [sys.executable, "-m", "dist_marsm.train", "--recipe", p], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 2
    assert "[optimizer] momentum" in out.stderr and p in out.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ overrides
def test_overrides_use_the_recipes_types(tmp_path):
    """Overrides go through tyro (torchtitan's CLI): typed by the config's annotations."""
    p = write(
        tmp_path,
        "[optimizer]\nlr = 0.01\nadamw_lr = 0.02\n[training]\nsteps = 5\n[lr_scheduler]\n"
        'warmup_steps = 1\n[checkpoint]\ninitial_load_path = "none"\n',
    )
    r = load_recipe(p)
    assert r.optimizer.adamw_lr == 0.02 and r.checkpoint.initial_load_path is None  # optional fields
    r = load_recipe(
        p,
        [
            "--optimizer.lr",
            "1e-3",
            "--training.steps=7",
            "--optimizer.adamw_betas",
            "0.8",
            "0.9",
            "--checkpoint.enable",
            "false",
            "--optimizer.adamw_lr",
            "None",
            "--optimizer.clip=False",
            "--optimizer.adamw_patterns",
            r"^layers\.0\.,norm",
        ],
    )
    assert r.optimizer.lr == 1e-3 and isinstance(r.optimizer.lr, float)
    assert r.training.steps == 7 and isinstance(r.training.steps, int)
    assert r.optimizer.adamw_betas == (0.8, 0.9)
    assert r.checkpoint.enable is False and r.optimizer.clip is False
    assert r.optimizer.adamw_lr is None
    assert r.optimizer.adamw_patterns == [r"^layers\.0\.", "norm"]
    r = load_recipe(
        p,
        [
            "--optimizer.adamw_betas",
            "0.85",
            "0.99",
            "--optimizer.lr",
            "2",
            "--job.dump_folder",
            "/x",
            "--parallelism.data_parallel_shard_degree",
            "-1",
        ],
    )
    assert r.optimizer.adamw_betas == (0.85, 0.99) and r.optimizer.lr == 2.0
    assert r.dump_folder == "/x" and r.parallelism.data_parallel_shard_degree == -1  # the SLURM tests' spelling
    # Untouched keys keep the recipe's values or the declaration's defaults.
    assert r.training.steps == 5 and r.optimizer.gamma == BY_NAME["gamma"].default


def test_recipe_lists_keep_their_items(tmp_path):
    """A TOML list is one value per item (a regex may hold a comma); an empty list is empty."""
    p = write(
        tmp_path,
        '[optimizer]\nadamw_patterns = ["^x{1,2}$", "norm"]\n[checkpoint]\nexclude_from_loading = []\n'
        '[override]\nimports = ["os.path"]\n',
    )
    r = load_recipe(p)
    assert r.optimizer.adamw_patterns == ["^x{1,2}$", "norm"] and r.checkpoint.exclude_from_loading == []
    assert r.override.imports == ["os.path"]  # torchtitan's own tyro rule for it applies to recipes too
    msg = error_of(write(tmp_path, '[optimizer]\nadamw_patterns = ["-x"]\n'))  # tyro would read it as a flag
    assert "[optimizer] adamw_patterns" in msg and "'-x'" in msg


def test_errors_name_the_key_at_fault(tmp_path):
    p = write(tmp_path, "[training]\nsteps = 5\n[lr_scheduler]\nwarmup_steps = 1\n")
    msg = error_of(p, ["--training.steps", "6", "--training.stepz", "3"])  # tyro suggests --training.steps
    assert "override --training.stepz: [training] stepz: unknown --training.stepz;" in msg, msg
    assert "did you mean --training.steps" in msg
    msg = error_of(write(tmp_path, 'activation_checkpoint = "bogus"\n'))
    assert "activation_checkpoint:bogus" in msg and "activation-checkpoint:selective" in msg
    msg = error_of(write(tmp_path, "[parallelism]\ntensor_parallel_degree = 2\n"), world_size=1)
    assert "[parallelism] the degrees do not fit (the job has 1 ranks)" in msg  # torchtitan's bare assert


@pytest.mark.parametrize(
    "args,key",
    [
        (["--training.steps", "1.5"], "[training] steps"),
        (["--optimizer.lr", "fast"], "[optimizer] lr"),
        (["--optimizer.momentum", "1"], "[optimizer] momentum"),
        (["--optimizer.nope", "1"], "[optimizer] nope"),
        (["--nosection.lr", "1"], "[nosection]"),
    ],
)
def test_bad_overrides_name_the_override(tmp_path, args, key):
    p = write(tmp_path, "[optimizer]\nlr = 0.01\n")
    msg = error_of(p, args)
    assert key in msg and f"override --{args[0][2:]}" in msg and p in msg


# ------------------------------------------------------------------ every shipped recipe translates
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_translates(recipe):
    """Every value the file sets is the config's value at that path (read back independently with tomllib)."""
    import tomllib

    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    from dist_marsm.titan import cpu_shims
    from dist_marsm.titan.optimizer_container import param_groups_of

    config = load_recipe(str(recipe))
    raw = tomllib.loads(recipe.read_text())

    def compare(obj, table, path):
        for key, value in table.items():
            got = getattr(obj, key)
            if isinstance(value, dict):
                compare(got, value, f"{path}{key}.")
            elif key == "hf_assets_path" and value == "embedded":
                assert os.path.isfile(os.path.join(got, "tokenizer.json")), got
            elif key == "activation_checkpoint":
                assert type(got).__qualname__.split(".")[0].lower().startswith(value[:4]), (value, got)
            else:
                want = tuple(value) if isinstance(got, tuple) else value
                assert got == want, (path + key, got, want)

    compare(config, raw, "")
    groups, _ = param_groups_of(config.optimizer)
    assert [g.optimizer_name for g in groups] == [raw["optimizer"]["name"]]
    assert groups[0].optimizer_kwargs["lr"] == raw["optimizer"]["lr"]
    n_layers = len(config.model_spec.model.layers)
    assert n_layers == {"debugmodel": 6, "debugmodel_cpu": 3, "8B": 32, "70B": 80}[raw["model"]["flavor"]]
    if cpu_shims.needs_cpu_shims():  # this machine: the CPU shims were applied to the config
        assert not list(config.model_spec.model.traverse(FlexAttention.Config))
        assert len(list(config.model_spec.model.traverse(ScaledDotProductAttention.Config))) == n_layers
        assert config.parallelism.spmd_backend == "partial_dtensor"


def test_config_registry_matches_recipe():
    from dist_marsm.titan import config_registry

    config = config_registry.debug_cpu()
    assert isinstance(config, config_registry.MARSMTrainerConfig)
    assert config.optimizer.name == "MARS-M"
    assert config.training.steps == load_recipe(str(ROOT / "recipes/debug_cpu.toml")).training.steps


# ------------------------------------------------------------------ routing inside torchtitan's container
def _debug_model(activation_checkpoint: bool):
    from torchtitan.distributed.activation_checkpoint import SelectiveAC
    from torchtitan.models.llama3 import model_registry

    spec = model_registry("debugmodel", attn_backend="flex")
    with torch.device("meta"):
        model = spec.model.build()
    if activation_checkpoint:
        SelectiveAC.Config().build(dump_folder="/tmp").apply(model)
    return model


@pytest.mark.parametrize("ac", [False, True], ids=["plain", "activation_checkpointing"])
def test_marsm_routing_in_container(ac):
    from torchtitan.components.optimizer import ParamGroupConfig

    from dist_marsm import DEFAULT_ADAMW_PATTERNS
    from dist_marsm.titan.optimizer_container import MARSMOptimizersContainer

    model = _debug_model(ac)
    raw_names = [n for n, _ in model.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in raw_names) == ac
    # Independent facts from the model's structure: per layer wqkv, wo, w1, w2, w3 are matrices.
    n_layers = len(model.layers)
    patterns = (*DEFAULT_ADAMW_PATTERNS, r"^layers\.0\.attention\.")  # adamw_patterns replace the defaults
    configs = [
        ParamGroupConfig(
            pattern=".*", optimizer_name="MARS-M", optimizer_kwargs={"lr": 1e-3, "adamw_patterns": patterns}
        )
    ]
    groups, patterns = MARSMOptimizersContainer._build_param_groups(model, configs, {"fused": True, "foreach": False})
    mars = [g for g in groups["MARS-M"] if g["use_mars"]]
    rest = [g for g in groups["MARS-M"] if not g["use_mars"]]
    assert len(mars) == len(rest) == 1 and len(patterns["MARS-M"]) == 2
    mars_names, rest_names = set(mars[0]["param_names"]), set(rest[0]["param_names"])
    assert all("_checkpoint_wrapped_module" not in n for n in mars_names | rest_names)
    # layer 0's attention (wqkv, wo) is sent to AdamW by the canonical-name pattern, even with AC on
    assert len(mars_names) == 5 * n_layers - 2
    assert {"layers.0.attention.qkv_linear.wqkv.weight", "layers.0.attention.wo.weight"} <= rest_names
    assert {"tok_embeddings.weight", "lm_head.weight", "norm.weight"} <= rest_names
    assert "layers.1.attention.qkv_linear.wqkv.weight" in mars_names
    assert all(p.ndim == 2 for p in mars[0]["params"])
    assert len(rest_names) == (2 * n_layers + 1) + 2 + 2
    for g in groups["MARS-M"]:  # routing keys and torchtitan's fused/foreach flags never reach MARSM
        assert not {"fused", "foreach", "adamw_patterns", "adamw_lr"} & set(g)


def test_distmuon_routing_from_recipe():
    from dist_marsm.titan.optimizer_container import MARSMOptimizersContainer, param_groups_of

    r = load_recipe(str(ROOT / "recipes/debug_cpu_distmuon.toml"))
    model = _debug_model(False)
    groups, _ = MARSMOptimizersContainer._build_param_groups(
        model, param_groups_of(r.optimizer)[0], {"fused": False, "foreach": True}
    )
    muon = [n for g in groups["DistMuon"] for n in g["param_names"]]
    adamw = [n for g in groups["AdamW"] for n in g["param_names"]]
    assert len(muon) == 30 and len(adamw) == 15 and not set(muon) & set(adamw)
    assert groups["AdamW"][0]["betas"] == (0.9, 0.95) and groups["AdamW"][0]["lr"] == r.optimizer.lr
    assert all("adamw_kwargs" not in g and "adamw_patterns" not in g for g in groups["DistMuon"])
    assert groups["DistMuon"][0]["adjust_lr_fn"] == "match_rms_adamw"


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(11, 8)
        self.proj = torch.nn.Linear(8, 8, bias=False)
        self.norm = torch.nn.LayerNorm(8)
        self.lm_head = torch.nn.Linear(8, 11, bias=False)


def _tiny_container(**settings):
    from dist_marsm.titan.optimizer_container import MARSMOptimizersContainer

    torch.manual_seed(0)
    model = _Tiny()
    cfg = MARSMOptimizersContainer.Config(**{"lr": 0.1, "wire_dtype": "float32", "ns_dtype": "float32", **settings})
    return model, cfg.build(model_parts=[model])


def test_container_builds_marsm_and_checkpoint_state_is_harmless():
    from dist_marsm import MARSM

    model, container = _tiny_container()
    assert [type(o) for o in container.optimizers] == [MARSM]
    routes = {g["use_mars"]: g["param_names"] for g in container.optimizers[0].param_groups}
    assert routes[True] == ["proj.weight"]
    assert set(routes[False]) == {"tok_embeddings.weight", "norm.weight", "norm.bias", "lm_head.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd = container.state_dict()  # torchtitan materializes state with a zero-gradient, lr = 0 step
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert "state.proj.weight.momentum" in sd and "state.lm_head.weight.exp_avg" in sd
    assert all(p.grad is None for p in model.parameters())


def test_container_resumes_a_checkpoint_without_a_new_group_key():
    from torchtitan.components.optimizer import OptimizersContainer

    model, container = _tiny_container()
    x = torch.randint(0, 11, (2, 5))
    model.lm_head(model.proj(model.norm(model.tok_embeddings(x)))).sum().backward()
    container.step()
    sd = container.state_dict()
    old = {k: v for k, v in sd.items() if not k.endswith(".normuon_beta2")}  # "added later" hyperparameter
    assert len(old) < len(sd)
    with pytest.raises(KeyError):  # what torchtitan alone does
        OptimizersContainer.load_state_dict(container, old)
    _, fresh = _tiny_container()
    fresh.load_state_dict(old)  # ours keeps the live value
    assert fresh.optimizers[0].param_groups[0]["normuon_beta2"] == 0.95
    assert torch.equal(
        fresh.optimizers[0].state[fresh.optimizers[0].param_groups[0]["params"][0]]["momentum"],
        sd["state.proj.weight.momentum"],
    )


# ------------------------------------------------------------------ metrics
def test_rms_to_inf_norm_is_the_operator_norm():
    from dist_marsm.titan.metrics import rms_to_inf_norm

    torch.manual_seed(0)
    w = torch.randn(13, 7, dtype=torch.float64)
    value = rms_to_inf_norm(w)
    rms = lambda v: v.norm() / math.sqrt(v.numel())  # noqa: E731
    # attained: the best row, normalized to unit RMS norm
    i = int(w.norm(dim=1).argmax())
    x = w[i] / rms(w[i])
    assert abs(float((w @ x).abs().max() / rms(x)) - value) < 1e-6 * value  # computed in float32
    # never exceeded by other inputs
    xs = torch.randn(2000, 7, dtype=torch.float64)
    ratios = (xs @ w.T).abs().max(dim=1).values / (xs.norm(dim=1) / math.sqrt(7))
    assert float(ratios.max()) <= value * (1 + 1e-6)
    # bf16 weights give the same number to bf16 precision
    assert abs(rms_to_inf_norm(w.to(torch.bfloat16)) - value) / value < 1e-2


@scenario(3)
def scenario_rms_to_inf_norm_of_dtensors(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dist_marsm.titan.metrics import rms_to_inf_norm

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    for rows in (13, 2):  # 2 rows on 3 ranks: one rank holds none
        w = torch.randn(rows, 7, dtype=torch.float64)
        expected = math.sqrt(7) * float(w.norm(dim=1).max())  # the plain tensor's value, float64
        for placement in (Shard(0), Shard(1)):
            value = rms_to_inf_norm(distribute_tensor(w, mesh, [placement]))
            assert abs(value - expected) < 1e-6 * expected, (rows, placement, value, expected)  # float32 sums


_check = scenario_check(__name__, timeout=300)


@pytest.mark.parametrize("world,scenario", scenario_cases(__name__))
def test_rms_to_inf_norm_of_sharded_weights(world, scenario):
    """Rows split (FSDP) or columns split (TP), shards uneven or empty: the whole matrix's norm."""
    _check(world, scenario)


def test_loss_plot(tmp_path):
    import json

    from dist_marsm import plot

    rows = [{"step": s, "loss": 5 - 0.1 * s, "optimizer_time_s": 0.1} for s in range(1, 11)]
    rows.append({"step": 10, "validation_loss": 4.2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.main([str(tmp_path / "missing")]) == 2


# ------------------------------------------------------------------ corpus and tokenizer
def test_corpus_split_and_tokenizer():
    from pydoc_data.topics import topics

    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from dist_marsm.titan import corpus

    train, val = corpus.documents("train"), corpus.documents("validation")
    assert len(train) + len(val) == len(topics) and not set(train) & set(val)
    assert 0.05 < sum(map(len, val)) / sum(map(len, train + val)) < 0.2
    d = corpus.tokenizer_dir(2048)
    assert corpus.tokenizer_dir(2048) == d  # cached
    tok = HuggingFaceTokenizer(tokenizer_path=d)
    assert tok.get_vocab_size() == 2048
    text = "The for statement is used to iterate over the elements of a sequence."
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < 2048
    assert tok.decode(ids[1:-1]) == text
    assert len(ids) < len(text) / 2  # a real BPE: well under one token per character on English


def test_import_dist_marsm_does_not_import_torchtitan():
    code = (
        "import sys, dist_marsm; bad = [m for m in sys.modules if m.startswith(('torchtitan', 'dist_marsm.titan',"
        " 'matplotlib', 'tokenizers'))]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_cpu_shims_are_idempotent_and_cpu_only():
    from dist_marsm.titan import cpu_shims

    if not cpu_shims.needs_cpu_shims():
        assert cpu_shims.apply_cpu_device_module() is False
        return
    assert cpu_shims.apply_cpu_device_module() is True
    assert cpu_shims.apply_cpu_device_module() is True
    import torchtitan.components.metrics as tt_metrics
    import torchtitan.distributed.utils as tt_dist
    import torchtitan.tools.utils as tt_utils

    for mod in (tt_utils, tt_dist, tt_metrics):
        assert mod.device_type == "cpu" and mod.device_module is cpu_shims.CPU_DEVICE_MODULE
    dm = cpu_shims.CPU_DEVICE_MODULE
    assert dm.get_device_properties(torch.device("cpu")).total_memory > 2**30
    assert {"active_bytes.all.peak", "reserved_bytes.all.peak"} <= set(dm.memory_stats())
    for fn in ("current_device", "reset_peak_memory_stats", "empty_cache", "synchronize", "get_device_name"):
        getattr(dm, fn)()
    dm.set_device(torch.device("cpu", 0))
    os.environ["LOCAL_RANK"] = "1"  # rank 1 of a one-"device" CPU machine still gets cpu:0
    try:
        assert tt_utils.get_local_device() == torch.device("cpu", 0)
    finally:
        del os.environ["LOCAL_RANK"]


def test_dcp_resume_after_a_hyperparameter_is_added(tmp_path):
    """Save with today's MARSM, load into a MARSM whose groups carry one more hyperparameter (a later
    version): torch.distributed.checkpoint loads (it fails on a key the checkpoint lacks) and the new key
    keeps its live value; the state saved matches."""
    import torch.distributed.checkpoint as dcp

    model, container = _tiny_container()
    x = torch.randint(0, 11, (2, 5))
    model.lm_head(model.proj(model.norm(model.tok_embeddings(x)))).sum().backward()
    container.step()
    dcp.save({"optimizer": container}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    _, fresh = _tiny_container()
    for group in fresh.optimizers[0].param_groups:
        group["new_hyperparameter"] = 0.5
    dcp.load({"optimizer": fresh}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    opt, ref = fresh.optimizers[0], container.optimizers[0]
    assert all(g["new_hyperparameter"] == 0.5 for g in opt.param_groups)
    p, q = opt.param_groups[0]["params"][0], ref.param_groups[0]["params"][0]
    assert torch.equal(opt.state[p]["momentum"], ref.state[q]["momentum"])
    assert torch.equal(opt.state[p]["prev_grad"], ref.state[q]["prev_grad"])


def test_metrics_file_keeps_one_line_per_step_on_resume(tmp_path):
    """A run resumed at step 4 (its checkpoint was at 3) redoes steps 4.. : their old lines are dropped, and
    a line cut by a crash too."""
    import json

    from dist_marsm.titan.metrics import JsonlLogger

    def steps():
        return [json.loads(line)["step"] for line in path.read_text().splitlines()]

    path = tmp_path / "out" / "metrics.jsonl"
    first = JsonlLogger(str(path))
    for s in range(1, 7):
        first.log({"loss_metrics/global_avg_loss": 1.0 / s}, s)
    with open(path, "a") as f:
        f.write('{"step": null}\n{"step": 2, "lo')  # a line without a step, and the crash
    resumed = JsonlLogger(str(path))
    resumed.log({"loss_metrics/global_avg_loss": 0.5}, 4)
    resumed.log({"validation_metrics/loss": 0.7}, 4)  # a second line of the same step stays
    assert steps() == [1, 2, 3, 4, 4]
    assert json.loads(path.read_text().splitlines()[3])["loss"] == 0.5
    assert json.loads(path.read_text().splitlines()[4])["validation_loss"] == 0.7
    JsonlLogger(str(path)).log({}, 1)  # a fresh run in an old folder starts the file again
    assert steps() == [1]


# ------------------------------------------------------------------ recipe checks (issue 14)
def test_steps_not_above_warmup_stops_before_training(tmp_path):
    """warm-up == steps used to crash inside torchtitan's scheduler at the last step."""
    recipe = str(ROOT / "recipes/debug_cpu.toml")
    msg = error_of(recipe, ["--training.steps", "8"])  # the recipe's warmup_steps is 8
    assert recipe in msg and "[lr_scheduler] warmup_steps" in msg and "[training] steps" in msg
    p = write(tmp_path, "[training]\nsteps = 5\n[lr_scheduler]\nwarmup_steps = 5\n")
    msg = error_of(p)
    assert p in msg and "[lr_scheduler] warmup_steps (5)" in msg and "[training] steps (5)" in msg
    load_recipe(
        write(tmp_path, "[training]\nsteps = 6\n[lr_scheduler]\nwarmup_steps = 5\n")
    )  # one step after is enough


def test_directory_as_recipe(tmp_path):
    msg = error_of(str(tmp_path))
    assert str(tmp_path) in msg and "is a directory" in msg


def _fake_checkpoint(dump, step=2, **settings):
    import torch.distributed.checkpoint as dcp

    model, container = _tiny_container(**settings)
    dcp.save({"optimizer": container}, checkpoint_id=str(dump / "checkpoint" / f"step-{step}"), no_dist=True)
    return container


def test_optimizer_name_change_at_resume_is_named(tmp_path):
    from dist_marsm.train import check_resume

    recipe = str(ROOT / "recipes/debug_cpu.toml")
    _fake_checkpoint(tmp_path)
    config = load_recipe(recipe, ["--dump_folder", str(tmp_path), "--optimizer.name", "AdamW"])
    with pytest.raises(RecipeError) as info:
        check_resume(config, recipe)
    msg = str(info.value)
    assert recipe in msg and "[optimizer] name" in msg and "'MARS-M'" in msg and "step-2" in msg
    check_resume(load_recipe(recipe, ["--dump_folder", str(tmp_path)]), recipe)  # same optimizer: fine
    check_resume(
        load_recipe(
            recipe,
            [
                "--dump_folder",
                str(tmp_path),
                "--optimizer.name",
                "AdamW",
                "--checkpoint.exclude_from_loading",
                "optimizer",
            ],
        ),
        recipe,
    )


def test_entry_point_stops_on_a_directory_and_on_another_optimizers_checkpoint(tmp_path):
    """A short error and exit code 2, not a traceback (DCP printed ~200 lines for the second)."""
    dump = tmp_path / "dump"
    _fake_checkpoint(dump)
    for args, words in [
        (["--recipe", str(tmp_path)], ["is a directory"]),
        (
            ["--recipe", "recipes/debug_cpu.toml", "--dump_folder", str(dump), "--optimizer.name", "AdamW"],
            ["[optimizer] name", "recipes/debug_cpu.toml", "MARS-M"],
        ),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", "dist_marsm.train", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
        )
        assert out.returncode == 2, out.stderr[-3000:]
        error = [line for line in out.stderr.splitlines() if "dist_marsm.train: error" in line]
        assert len(error) == 1 and all(w in error[0] for w in words), out.stderr[-3000:]
        assert "Traceback" not in out.stderr


# ------------------------------------------------------------------ resume policy (issue 14)
def _step_once(model, container):
    x = torch.randint(0, 11, (2, 5))
    model.lm_head(model.proj(model.norm(model.tok_embeddings(x)))).sum().backward()
    container.step()


def test_resume_recipe_settings_win_except_the_scheduled_lr(caplog):
    def scheduled(container):  # torch LR schedulers add initial_lr (torchtitan's drive each optimizer)
        for optim in container.optimizers:
            torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0)
        return container

    model, saved = _tiny_container(momentum=0.95, gamma=0.025)
    scheduled(saved)
    _step_once(model, saved)
    sd = saved.state_dict()
    _, resumed = _tiny_container(momentum=0.5, gamma=0.5, lr=0.3)
    scheduled(resumed)
    with caplog.at_level("INFO"):  # torchtitan's logger (the root logger)
        resumed.load_state_dict(sd)
    opt = resumed.optimizers[0]
    for group in opt.param_groups:
        assert group["momentum"] == 0.5 and group["gamma"] == 0.5  # the recipe's, not the checkpoint's
        assert group["lr"] == group["initial_lr"] == 0.1  # the checkpoint's: the scheduler drives it
    p = opt.param_groups[0]["params"][0]
    ref = saved.optimizers[0]
    assert torch.equal(opt.state[p]["momentum"], ref.state[ref.param_groups[0]["params"][0]]["momentum"])
    lines = [r.getMessage() for r in caplog.records]
    assert sum("resume: momentum 0.95 -> 0.5" in m for m in lines) == 1, lines  # once, not once per group
    assert sum("resume: gamma 0.025 -> 0.5" in m for m in lines) == 1, lines
    assert sum("resume: peak lr (initial_lr) stays 0.1" in m and "0.3" in m for m in lines) == 1, lines
    assert resumed.state_dict()["param_groups.proj.weight.momentum"] == 0.5  # and saved again as such


def test_plain_marsm_load_state_dict_restores_the_saved_values():
    """torch.optim's contract, unchanged by the glue: MARSM.load_state_dict restores the saved settings."""
    from dist_marsm import MARSM, build_param_groups

    torch.manual_seed(0)
    model = _Tiny()
    a = MARSM(build_param_groups(model), lr=0.1, momentum=0.95, ns_dtype="float32", process_group=None)
    x = torch.randint(0, 11, (2, 5))
    model.lm_head(model.proj(model.norm(model.tok_embeddings(x)))).sum().backward()
    a.step()
    b = MARSM(build_param_groups(model), lr=0.1, momentum=0.5, ns_dtype="float32", process_group=None)
    b.load_state_dict(a.state_dict())
    assert all(g["momentum"] == 0.95 for g in b.param_groups)


# ------------------------------------------------------------------ the typed config and its CLI
def _help_text(cmd) -> str:
    import re

    env = dict(os.environ, COLUMNS="100")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return re.sub(r"\s+", " ", re.sub(r"[\u2500-\u257f]", " ", out.stdout))


def test_help_lists_every_marsm_setting_with_its_doc():
    from dist_marsm.titan.optimizer_container import CONFIG_SETTINGS

    assert {s.name for s in CONFIG_SETTINGS} >= {"momentum", "gamma", "variant", "wire_dtype", "nonfinite"}
    ours = _help_text(
        [
            sys.executable,
            "-m",
            "dist_marsm.train",
            "--recipe",
            "recipes/debug_cpu.toml",
            "--optimizer.gamma",
            "0",
            "--help",
        ]
    )
    theirs = _help_text(
        [sys.executable, "-m", "torchtitan.train", "--module", "dist_marsm.titan", "--config", "debug_cpu", "--help"]
    )
    for text in (ours, theirs):
        for s in CONFIG_SETTINGS:
            flag = f"--optimizer.{s.name.replace('_', '-')}"
            assert flag in text, flag
            assert " ".join(f"MARS-M: {s.doc}".split()[:6]) in text, s.name
    # the defaults shown are the recipe's (lr 6e-3; the declaration's default is 3e-3)
    assert "(default: 0.006)" in ours.split("--optimizer.lr FLOAT", 1)[1][:200]


def test_a_new_setting_reaches_the_typed_config_and_the_loader(tmp_path, monkeypatch):
    """Adding a setting touches the declaration only: a config class built from the declaration has it,
    typed (Literal choices, tuples), and the TOML loader checks it (ns_method/ns_coefficients arrived so)."""
    import dataclasses
    import typing

    from dist_marsm import settings
    from dist_marsm.titan import optimizer_container as oc
    from dist_marsm.titan import recipe

    r = load_recipe(str(ROOT / "recipes/debug_cpu.toml"), ["--optimizer.ns_head_dim", "64"])
    assert r.optimizer.ns_head_dim == 64  # a setting with a None default, settable
    extra = (
        settings.Setting(
            "future_method",
            "quintic",
            "which iteration",
            "one of ('quintic', 'polar')",
            lambda x: x in ("quintic", "polar"),
            ("quintic", "polar"),
        ),
        settings.Setting(
            "future_coefficients",
            (3.4445, -4.775, 2.0315),
            "iteration coefficients",
            "three numbers",
            lambda x: isinstance(x, tuple) and len(x) == 3,
        ),
        settings.Setting(
            "future_rows",
            None,
            "rows per block",
            "None or an int >= 1",
            lambda x: x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 1),
            kind=typing.Optional[int],
        ),
    )
    monkeypatch.setattr(oc, "CONFIG_SETTINGS", oc.CONFIG_SETTINGS + extra)
    fields = oc._config_fields()
    hints = {name: typing.get_args(ann)[0] for name, ann, _ in fields}
    assert hints["future_method"] == typing.Literal["quintic", "polar"]
    assert hints["future_coefficients"] == tuple[float, ...]
    assert hints["future_rows"] == typing.Optional[int]  # a None default: the declared kind
    # The TOML loader (tyro under the annotations) takes and checks them with no change of its own.
    config_cls = dataclasses.make_dataclass("Config", fields, kw_only=True)

    def load(table):
        options, subcommands = recipe._recipe_args(config_cls(), table, "r.toml", ("optimizer",))
        return recipe._parse(
            config_cls(), [a.replace("--optimizer.", "--") for a in options], "r.toml", "t", overrides=False
        )

    c = load({"future_method": "polar", "future_coefficients": [1, 2.5, 3], "future_rows": 64})
    assert (c.future_method, c.future_coefficients, c.future_rows) == ("polar", (1.0, 2.5, 3.0), 64)
    assert load({"future_rows": "none"}).future_rows is None
    for table in ({"future_method": "cubic"}, {"future_coefficients": ["a"]}, {"future_rows": 1.5}):
        with pytest.raises(RecipeError, match=f"r.toml: {next(iter(table))} must be"):
            load(table)


def test_unfused_qkv_has_the_fused_rows_as_three_matrices():
    def attention_shapes(overrides):
        config = load_recipe(str(ROOT / "recipes/debug_cpu.toml"), overrides)
        with torch.device("meta"):
            model = config.model_spec.model.build()
        return {
            n.rsplit(".", 2)[-2]: tuple(p.shape)
            for n, p in model.named_parameters()
            if n.startswith("layers.0.attention.qkv_linear")
        }

    fused, unfused = attention_shapes([]), attention_shapes(["--model.fuse_qkv", "false"])
    assert set(fused) == {"wqkv"} and set(unfused) == {"wq", "wk", "wv"}
    assert sum(s[0] for s in unfused.values()) == fused["wqkv"][0]
    assert {s[1] for s in unfused.values()} == {fused["wqkv"][1]}
