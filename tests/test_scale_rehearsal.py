"""The scale rehearsal (benchmarks/scale_rehearsal.py) keeps working and keeps telling the truth.

- At W = 4 its counts (collectives per step, all_to_all bytes sent and received, the engine's and the
  plan's bytes, owned Newton-Schulz FLOPs, buckets, peak transient bytes) equal a real 4-rank gloo run of
  the same torchtitan model, rank by rank, on FSDP, HSDP and FSDP x TP meshes.
- At W = 64 it runs in seconds on a small model, and what it reports agrees with the model's own local
  shards.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import scale_rehearsal as rehearsal  # noqa: E402
from _spawn import run_scenarios, scenario, scenario_cases  # noqa: E402

FLAVOR = "debugmodel"  # torchtitan's llama3 debug model: dim 256, 16 heads
LAYERS = 2
BUCKET_MB = 0.25  # several buckets even in the small model
MESHES_4 = {"FSDP 4": (1, 4, 1), "HSDP 2x2": (2, 2, 1), "FSDP 2 x TP 2": (1, 2, 2)}
COMPARED = (
    "collectives",
    "a2a_bytes_sent",
    "a2a_bytes_received",
    "engine_collectives",
    "engine_bytes_sent",
    "engine_bytes_received",
    "plan_bytes_sent",
    "plan_bytes_received",
    "owned_ns_flops",
    "buckets",
    "peak_transient_bytes",
)
OUT_ENV = "SCALE_REHEARSAL_GLOO_OUT"


class CountingCollectives(rehearsal.MirroredGroup):
    """The rehearsal's counting, around the real collectives of a real process group."""

    def __init__(self):
        super().__init__()
        self.real = {n: getattr(dist, n) for n in ("all_reduce", "all_gather_object", "all_to_all_single")}

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        self._count("all_reduce")
        self.allreduce_bytes += tensor.numel() * tensor.element_size()
        return self.real["all_reduce"](tensor, op=op, group=group, async_op=async_op)

    def all_gather_object(self, object_list, obj, group=None):
        self._count("all_gather_object")
        return self.real["all_gather_object"](object_list, obj, group=group)

    def all_to_all_single(
        self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        self._count("all_to_all_single")
        me = dist.get_rank(group)
        self.bytes_sent += (sum(input_split_sizes) - input_split_sizes[me]) * input.element_size()
        self.bytes_received += (sum(output_split_sizes) - output_split_sizes[me]) * output.element_size()
        return self.real["all_to_all_single"](
            output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
        )


@scenario(4)
def gloo_counts(rank: int, world: int) -> None:
    """One rank of the real job: two steps per mesh, the second step's counts written as JSON."""
    out = {}
    for name, mesh in MESHES_4.items():
        model = rehearsal.build_model(FLAVOR, LAYERS, mesh, None)
        rehearsal.init_parameters(model)
        opt = rehearsal.build_optimizer(model, bucket_mb=BUCKET_MB)
        counter = CountingCollectives()
        with counter.active():
            for step in range(2):
                rehearsal.fill_gradients(model, step)
                counter.reset()
                opt.step()
        out[name] = {
            "collectives": counter.calls,
            "a2a_bytes_sent": counter.bytes_sent,
            "a2a_bytes_received": counter.bytes_received,
            **rehearsal.step_counts(opt),
        }
    Path(os.environ[OUT_ENV], f"{rank}.json").write_text(json.dumps(out))


@pytest.fixture
def _no_group_left():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


CASES = scenario_cases(__name__)


@pytest.mark.slow
def test_rehearsal_counts_equal_a_real_gloo_run(tmp_path, monkeypatch, _no_group_left):
    monkeypatch.setenv(OUT_ENV, str(tmp_path))
    errors = run_scenarios(__name__, [name for _, name in CASES], 4, timeout=600)["gloo_counts"]
    assert all(e is None for e in errors), "\n".join(e for e in errors if e)
    real = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    mirrored, ns = rehearsal.MirroredGroup(), rehearsal.StandinNewtonSchulz()
    for name, mesh in MESHES_4.items():
        for rank in range(4):
            row = rehearsal.step_row(FLAVOR, name, rank, LAYERS, 2, mirrored, ns, mesh=mesh, bucket_mb=BUCKET_MB)
            got = {k: row[k] for k in COMPARED}
            want = {k: real[rank][name][k] for k in COMPARED}
            assert got == want, (name, rank, got, want)
            # The stood-in Newton-Schulz saw exactly the matrices this rank owns.
            assert row["ns_tflop_this_rank"] * 1e12 == pytest.approx(row["owned_ns_flops"], rel=1e-12)
    assert any(real[r][n]["owned_ns_flops"] for r in range(4) for n in MESHES_4)


def test_rehearsal_at_64_ranks(_no_group_left):
    """A rank that owns nothing sends its block of every matrix once and receives its block of every update
    (bf16 on the wire); the busiest owner's gathered buckets stay within the documented bound."""
    world, mesh = 64, (1, 64, 1)
    mirrored, ns = rehearsal.MirroredGroup(), rehearsal.StandinNewtonSchulz()
    plan = rehearsal.plan_row(FLAVOR, "FSDP 64", world - 1, mirrored, mesh=mesh)
    assert plan["world"] == world and plan["owned_tflop"] == 0, plan  # 42 matrices, 64 ranks
    rows = {}
    for rank in (world - 1, plan["busiest_rank"]):
        rows[rank] = row = rehearsal.step_row(FLAVOR, "FSDP 64", rank, None, 2, mirrored, ns, mesh=mesh)
        assert row["collectives"] == {"all_reduce": 1, "all_to_all_single": 2 * row["buckets"]}, row
        assert row["a2a_bytes_sent"] == row["engine_bytes_sent"] == row["plan_bytes_sent"], row
        assert row["a2a_bytes_received"] == row["engine_bytes_received"] == row["plan_bytes_received"], row
        assert 0 <= row["peak_transient_bytes"] <= row["transient_bound_bytes"], row
    idle = rows[world - 1]
    # Independent of the plan: this rank's local shards of the MARS-M matrices, from the model itself.
    model = rehearsal.build_model(FLAVOR, None, mesh, world - 1)
    groups = rehearsal.build_param_groups(model)
    matrix_elements = sum(p.to_local().numel() for g in groups if g["use_mars"] for p in g["params"])
    assert idle["ns_tflop_this_rank"] == 0 and idle["peak_transient_bytes"] <= 2 * 2 * matrix_elements
    assert idle["a2a_bytes_sent"] == idle["a2a_bytes_received"] == 2 * matrix_elements, (idle, matrix_elements)
    busiest = rows[plan["busiest_rank"]]
    assert busiest["ns_tflop_this_rank"] > 0 and busiest["peak_transient_bytes"] > 0
    assert math.isclose(busiest["ns_tflop_this_rank"], busiest["owned_ns_flops"] / 1e12, rel_tol=1e-12)


def test_rehearsal_entry_point_runs_end_to_end(monkeypatch, _no_group_left):
    """``python benchmarks/scale_rehearsal.py`` itself (here on the debug model at 64 ranks, results kept in
    memory): every plan it builds, the probe for the stepped model's busiest owner included, must pass the
    plan agreement under the mirrored group, and the rows must name that owner."""
    saved = {}
    import _common  # the benchmarks' own helpers (benchmarks/ is on sys.path, as for scale_rehearsal)

    monkeypatch.setattr(_common, "save", lambda name, data, md: saved.update(name=name, data=data))
    # plan_balance.py knows the Llama 3 8B / 70B shapes only; its cross-check is not what this test is about.
    monkeypatch.setattr(rehearsal, "plan_balance_busiest_tflop", lambda flavor, world: 0.0)
    data = rehearsal.main(["--models", FLAVOR, "--meshes", "FSDP 64", "--steps", "2", "--out", "unused"])
    assert saved["name"] == "unused" and saved["data"] is data
    assert {r["rank"] for r in data["plan"]} >= {0, 63} and all(r["world"] == 64 for r in data["plan"])
    busiest = [r for r in data["steps"] if r["busiest"]]
    assert len(busiest) == 1 and busiest[0]["ns_tflop_this_rank"] > 0, data["steps"]
    assert any(r["rank"] == 63 and r["ns_tflop_this_rank"] == 0 for r in data["steps"]), data["steps"]
