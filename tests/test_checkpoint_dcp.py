"""MARSM state through torch.distributed.checkpoint (DCP) with torchtitan's flat optimizer layout,
without the Trainer: FSDP2 TinyLM (awkward shapes: 3-row matrices, so some of 4 ranks hold empty
shards), MARSM float32 wire and Newton-Schulz, spawned gloo ranks.

* torchtitan's state materialization (``init_optim_state``: zero gradients, lr = 0, one step) leaves
  MARSM's parameters bitwise unchanged (all variants, NorMuon, weight decay > 0) and creates every
  state tensor with the parameter's placements.
* Save at 4 ranks after 3 steps, load at 2 ranks: every state tensor (gathered) equals the 4-rank one
  bitwise, and 3 more steps end within 1e-5 (absolute, parameters of size ~0.1-1) of the
  uninterrupted 4-rank run. The only difference is the summation order of FSDP's gradient
  reduction over 4 vs 2 ranks (each rank computes the same batch here), ~1e-7 per step.
* Bad input: a truncated data file, a truncated ``.metadata``, a checkpoint of another model (a
  different shape) and of another optimizer (torch AdamW: no momentum) each raise an error naming
  the problem, and afterwards the good checkpoint still loads. torchtitan's CheckpointManager skips a
  step folder without ``.metadata`` (a save that did not finish) when it picks the latest.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from _spawn import run_scenarios, scenario, scenario_cases

pytestmark = pytest.mark.slow

MODULE = "test_checkpoint_dcp"
FP32 = dict(lr=0.05, weight_decay=0.1, ns_dtype="float32", wire_dtype="float32")
DIR_ENV = "DIST_MARSM_TEST_DCP_DIR"


# ----------------------------------------------------------------------------- helpers (in the ranks)
def _setup(world, seed=0, dim=6, optimizer="marsm", **opt_kw):
    from test_distributed import fsdp_wrap, make_model
    from torch.distributed.device_mesh import init_device_mesh

    from dist_marsm import MARSM, build_param_groups

    model = fsdp_wrap(make_model(seed, dim=dim), init_device_mesh("cpu", (world,)))
    if optimizer == "adamw":
        names, params = zip(*model.named_parameters())
        opt = torch.optim.AdamW([{"params": list(params), "param_names": list(names)}], lr=0.01)
    else:
        opt = MARSM(build_param_groups(model), **{**FP32, **opt_kw})
    return model, opt


def _train(model, opt, steps):
    from test_distributed import lm_loss

    for step in steps:
        opt.zero_grad()
        lm_loss(model, step).backward()  # every rank the same batch: the gradient does not depend on world
        opt.step()


def _state(model, opt) -> dict:
    from torchtitan.components.optimizer.utils import get_flat_optim_state_dict, init_optim_state

    init_optim_state(opt)
    return {"model": model.state_dict(), "optimizer": get_flat_optim_state_dict(opt)}


def _load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.optimizer.utils import load_flat_optim_state_dict

    state = _state(model, opt)
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    load_flat_optim_state_dict(opt, state["optimizer"])


def _full(v):
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def _full_state(model, opt) -> dict:
    s = _state(model, opt)
    out = {f"model.{k}": _full(v).detach().clone() for k, v in s["model"].items()}
    out.update({f"optimizer.{k}": _full(v).detach().clone() for k, v in s["optimizer"].items() if torch.is_tensor(v)})
    return out


def _dir():
    return os.environ[DIR_ENV]


def _expect_error(fn, *needles):
    try:
        fn()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        text = f"{type(e).__name__}: {e}"
        assert any(n.lower() in text.lower() for n in needles), text[:2000]
        return text
    raise AssertionError(f"no error; expected one mentioning {needles}")


# ----------------------------------------------------------------------------- scenarios
@scenario(4)
def init_state_leaves_params_unchanged(rank, world):
    from torchtitan.components.optimizer.utils import init_optim_state

    for kw in (
        dict(variant="approx"),
        dict(variant="efficient"),
        dict(variant="approx", normalize="neuron"),
        dict(variant="approx", wire_dtype="bfloat16", ns_dtype="bfloat16"),
    ):
        model, opt = _setup(world, seed=3, **kw)
        before = [p.detach().clone() for p in model.parameters()]
        init_optim_state(opt)
        for p, b in zip(model.parameters(), before):
            assert torch.equal(_full(p), _full(b)), (kw, "parameter changed by the lr=0 step")
        assert all(p.grad is None for p in model.parameters())
        assert all(g["lr"] == FP32["lr"] for g in opt.param_groups)
        for g in opt.param_groups:
            for p in g["params"]:
                st = opt.state[p]
                keys = {"momentum", "step"} if g["use_mars"] else {"exp_avg", "exp_avg_sq", "step"}
                assert keys <= set(st), (kw, sorted(st))
                for k, v in st.items():
                    if k != "step":
                        assert v.placements == p.placements and v.shape == p.shape or k == "row_second_moment"
                        assert float(_full(v).abs().max()) == 0.0, (kw, k)


@scenario(4)
def save_at_4(rank, world):
    import torch.distributed.checkpoint as dcp

    model, opt = _setup(world)
    _train(model, opt, range(3))
    dcp.save(_state(model, opt), checkpoint_id=os.path.join(_dir(), "step-3"))
    full3 = _full_state(model, opt)
    _train(model, opt, range(3, 6))
    full6 = _full_state(model, opt)
    if rank == 0:
        torch.save({"step3": full3, "step6": full6}, os.path.join(_dir(), "reference.pt"))
    # A checkpoint of torch AdamW on the same model, and one of a wider model, for the mismatch tests.
    model_a, opt_a = _setup(world, optimizer="adamw")
    _train(model_a, opt_a, range(1))
    dcp.save(_state(model_a, opt_a), checkpoint_id=os.path.join(_dir(), "adamw"))
    model_w, opt_w = _setup(world, dim=8)
    _train(model_w, opt_w, range(1))
    dcp.save(_state(model_w, opt_w), checkpoint_id=os.path.join(_dir(), "wider"))


@scenario(2)
def load_at_2(rank, world):
    ref = torch.load(os.path.join(_dir(), "reference.pt"))
    model, opt = _setup(world, seed=7)  # other initial values: everything must come from the checkpoint
    _load(model, opt, os.path.join(_dir(), "step-3"))
    got = _full_state(model, opt)
    assert got.keys() == ref["step3"].keys(), sorted(set(got) ^ set(ref["step3"]))
    for k, v in got.items():
        assert torch.equal(v, ref["step3"][k]), k
    assert any(k.endswith(".momentum") for k in got) and any(k.endswith(".prev_grad") for k in got)
    assert any(k.endswith(".exp_avg_sq") for k in got)
    _train(model, opt, range(3, 6))
    got = _full_state(model, opt)
    worst = max(float((got[k] - ref["step6"][k]).abs().max()) for k in got)
    moved = max(float((ref["step6"][k] - ref["step3"][k]).abs().max()) for k in got if k.startswith("model."))
    if rank == 0:
        print(f"4->2 resume: max |difference| after 3 more steps {worst:.3g}, parameter movement {moved:.3g}")
    assert worst < 1e-5 and moved > 1e-2, (worst, moved)


@scenario(2)
def bad_checkpoints(rank, world):
    import torch.distributed as dist

    good = os.path.join(_dir(), "step-3")
    trunc, meta = os.path.join(_dir(), "truncated"), os.path.join(_dir(), "bad_metadata")
    if rank == 0:
        for dst in (trunc, meta):
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(good, dst)
        data = sorted(f for f in os.listdir(trunc) if f.endswith(".distcp"))
        path = os.path.join(trunc, data[-1])
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        path = os.path.join(meta, ".metadata")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    dist.barrier()
    messages = {}
    model, opt = _setup(world)
    messages["truncated data"] = _expect_error(lambda: _load(model, opt, trunc), "CheckpointException")
    messages["truncated metadata"] = _expect_error(lambda: _load(model, opt, meta), "UnpicklingError", "pickle", "EOF")
    messages["other optimizer"] = _expect_error(lambda: _load(model, opt, os.path.join(_dir(), "adamw")), "momentum")
    messages["other model"] = _expect_error(lambda: _load(model, opt, os.path.join(_dir(), "wider")), "size mismatch")
    if rank == 0:
        for k, v in messages.items():
            print(f"--- {k}: {v[:600]}")
    # After all that, the good checkpoint still loads into the same objects, exactly.
    ref = torch.load(os.path.join(_dir(), "reference.pt"))
    model, opt = _setup(world, seed=11)
    _load(model, opt, good)
    got = _full_state(model, opt)
    assert all(torch.equal(v, ref["step3"][k]) for k, v in got.items())


CASES = scenario_cases(MODULE)


# ----------------------------------------------------------------------------- tests
def _check(results):
    bad = {k: [e for e in v if e] for k, v in results.items() if any(v)}
    assert not bad, "\n".join(f"{k}:\n{v[0]}" for k, v in bad.items())


def test_dcp_save_4_load_2_and_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    for world in (4, 2):  # save at 4 ranks, then load at 2
        _check(run_scenarios(MODULE, [n for w, n in CASES if w == world], world=world, timeout=400))


def test_checkpoint_manager_skips_unfinished_save(tmp_path):
    """torchtitan picks the newest step folder that has .metadata (written last, by rank 0, after every
    rank's data files and a rename from .metadata.tmp)."""
    from types import SimpleNamespace

    from torchtitan.components.checkpointer.dcp import CheckpointManager

    for step, files in (
        (2, ["__0_0.distcp", "__1_0.distcp", ".metadata"]),
        (4, ["__0_0.distcp", "__1_0.distcp"]),
        (6, ["__0_0.distcp", ".metadata.tmp"]),
    ):
        os.makedirs(tmp_path / f"step-{step}")
        for name in files:
            (tmp_path / f"step-{step}" / name).write_bytes(b"x")
    assert CheckpointManager._find_load_step(SimpleNamespace(), str(tmp_path)) == 2
