"""QK-clip (MuonClip, Kimi K2): cap every attention head's pre-softmax logits after each step (layer 3).

After the optimizer step, every head h whose largest logit ``S_h = max_{i<=j} q_i . k_j * scale`` over
the step's forward passes exceeded ``tau`` has its query and key projection rows scaled so that the
same inputs would give ``S_h = tau``: ``gamma_h = tau / S_h``, query rows and key rows of the head
each by ``sqrt(gamma_h)``. A key head shared by several query heads (GQA/MQA) is left untouched and
the query rows take the whole ``gamma_h``, which is how the Kimi K2 report treats MLA's shared rotary
key (the per-head rotary query takes ``gamma_h``, the shared key nothing), so clipping one head never
changes another head's logits. Heads at or below ``tau`` are bitwise untouched. Sources and the
reasoning in docs/attention.md.

Under data parallelism every rank sees different tokens, so the maxima are reduced with ONE packed
``MAX`` all-reduce per step for all layers and heads (4 bytes per head per layer) before anyone
rescales; without it, replicas would scale differently and diverge. The rescale runs on each rank's
local rows (an FSDP2 DTensor shard or a plain replica): which global rows a rank holds comes from
:func:`dist_marsm.layouts.dtensor_layout`, computed once per parameter.

Nothing persists across steps: the maxima are reset by :meth:`QKClip.apply`, so a checkpoint taken
after the step has nothing of QK-clip to save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class QKClipSettings:
    """The one declaration of QK-clip's settings."""

    tau: float | None = None  # logit threshold; None: QK-clip off (the Kimi K2 run used 100)

    def __post_init__(self):
        t = self.tau
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
            raise ValueError(f"QKClipSettings.tau must be None (off) or a finite number > 0, got {t!r}")

    @property
    def enabled(self) -> bool:
        return self.tau is not None


@dataclass
class AttentionSpec:
    """One attention layer: its query/key projection weights and head geometry.

    Either ``wq`` and ``wk`` (separate projections, rows ``[n_heads * head_dim]`` and
    ``[n_kv_heads * head_dim]``, head-major), or ``wqkv``: one fused projection in torchtitan's
    ``FusedQKVLinear`` row layout ``[n_kv_heads, n_heads // n_kv_heads + 2, head_dim]`` (per KV group:
    its query heads, then its key head, then its value head). Weights are plain tensors or DTensors
    (FSDP2 shards rows; any placement :func:`dtensor_layout` accepts works, since only rows are scaled).
    """

    name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    wq: torch.Tensor | None = None
    wk: torch.Tensor | None = None
    wqkv: torch.Tensor | None = None

    def __post_init__(self):
        where = f"AttentionSpec {self.name!r}"
        for key in ("n_heads", "n_kv_heads", "head_dim"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{where}: {key} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{where}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        fused = self.wqkv is not None
        if fused == (self.wq is not None or self.wk is not None) or (
            not fused and (self.wq is None or self.wk is None)
        ):
            raise ValueError(f"{where}: give either wq and wk, or wqkv alone")
        for key, rows in self.expected_rows().items():
            p = getattr(self, key)
            if p.ndim != 2 or p.shape[0] != rows:
                raise ValueError(
                    f"{where}: {key} has shape {tuple(p.shape)}, expected ({rows}, in_features) "
                    f"for n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"
                )

    def expected_rows(self) -> dict[str, int]:
        if self.wqkv is not None:
            return {"wqkv": (self.n_heads + 2 * self.n_kv_heads) * self.head_dim}
        return {"wq": self.n_heads * self.head_dim, "wk": self.n_kv_heads * self.head_dim}

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, getattr(self, k)) for k in self.expected_rows()]

    def row_codes(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """For global row indices of weight ``key``: query head h -> h, key head j -> n_heads + j, value -> -1."""
        hd = self.head_dim
        if key == "wq":
            return rows // hd
        if key == "wk":
            return self.n_heads + rows // hd
        group = self.n_heads // self.n_kv_heads
        slot = (rows // hd) % (group + 2)
        kv = rows // (hd * (group + 2))
        return torch.where(
            slot < group, kv * group + slot, torch.where(slot == group, self.n_heads + kv, torch.full_like(rows, -1))
        )


# Logits per block of query rows: CPU blocks that stay in cache; accelerators want few, large launches.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "other": 1 << 27}


def per_head_max_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    max_chunk_elements: int | None = None,
) -> torch.Tensor:
    """Largest pre-softmax logit per query head: ``max_{b, i, j<=i} q[b,i,h] . k[b,j,h//g] * scale``.

    ``q`` is ``[B, L, n_heads, head_dim]``, ``k`` ``[B, S, n_kv_heads, head_dim]`` (the layout
    torchtitan hands its inner attention); query head h reads key head ``h // (n_heads // n_kv_heads)``
    (SDPA's ``enable_gqa``); ``scale`` defaults to ``head_dim ** -0.5`` like SDPA. Causal masking keeps
    ``j <= i`` (SDPA's top-left alignment). Computed without gradient in the inputs' dtype, by blocks
    of query rows: the keys before a block need no mask, only the block's diagonal square is masked,
    so causal attention costs about half of ``q @ k^T`` and the transient logits stay below
    ``max_chunk_elements`` (default :data:`CHUNK_ELEMENTS`: 4 MiB of float32 on CPU, 2^27 elements
    elsewhere). Returns float32 ``[n_heads]``.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"per_head_max_logits: q {tuple(q.shape)} and k {tuple(k.shape)} must be "
            "[B, L, heads, head_dim] with equal B and head_dim"
        )
    b, lq, nh, hd = q.shape
    lk, nkv = k.shape[1], k.shape[2]
    if nh % nkv:
        raise ValueError(f"per_head_max_logits: {nh} query heads are not a multiple of {nkv} key heads")
    g = nh // nkv
    scale = hd**-0.5 if scale is None else scale
    if max_chunk_elements is None:
        max_chunk_elements = CHUNK_ELEMENTS["cpu" if q.device.type == "cpu" else "other"]
    with torch.no_grad():
        qg = q.detach().reshape(b, lq, nkv, g, hd).permute(0, 2, 1, 3, 4)  # [B, n_kv, L, g, hd]
        kt = k.detach().permute(0, 2, 3, 1).reshape(b * nkv, hd, lk)  # [B * n_kv, hd, S]
        out = torch.full((nkv, g), -math.inf, dtype=torch.float32, device=q.device)

        def fold(logits, n_keys):  # logits [B * n_kv, rows * g, keys] -> running max per (kv, g)
            return torch.maximum(out, logits.view(b, nkv, -1, g, n_keys).amax(dim=(0, 2, 4)).float())

        rows = max(1, min(lq, max_chunk_elements // max(1, b * nh * lk)))
        for start in range(0, lq, rows):
            stop = min(lq, start + rows)
            qc = qg[:, :, start:stop].reshape(b * nkv, (stop - start) * g, hd)
            if not causal:
                out = fold(torch.bmm(qc, kt), lk)
                continue
            if start > 0:
                n_keys = min(start, lk)
                out = fold(torch.bmm(qc, kt[:, :, :n_keys]), n_keys)
            if start < lk:
                end = min(stop, lk)
                s = torch.bmm(qc, kt[:, :, start:end]).view(b * nkv, stop - start, g, end - start)
                above = torch.ones(stop - start, end - start, dtype=torch.bool, device=q.device).triu(1)
                out = fold(s.masked_fill_(above.unsqueeze(1), -math.inf), end - start)
        return out.reshape(nh) * scale


@dataclass
class _Weight:
    param: torch.Tensor  # the parameter; its local rows are fetched at each apply (FSDP may re-point them)
    codes: torch.Tensor  # per local row: index into the layer's factor table (-1: untouched)

    def local(self) -> torch.Tensor:
        return self.param.to_local() if hasattr(self.param, "to_local") else self.param


@dataclass
class _Layer:
    spec: AttentionSpec
    offset: int  # first slot of this layer's heads in the packed maxima
    weights: list[_Weight] = field(default_factory=list)


class QKClip:
    """Records per-head max logits during a step's forward passes and rescales q/k rows after the step.

    ``record(name, max_logits)`` after each forward (any number of micro-batches; the running max is
    kept), ``apply()`` after ``optimizer.step()``. ``process_group``: the data-parallel ranks whose
    maxima are combined (default: the parameters' mesh for DTensors on a 1-D mesh or a mesh spanning
    the world, the default group for plain tensors under torch.distributed, none in one process).
    """

    def __init__(self, specs: list[AttentionSpec], settings: QKClipSettings | float | None = None, process_group=None):
        if not isinstance(settings, QKClipSettings):
            settings = QKClipSettings(tau=settings)
        self.settings = settings
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"QKClip: attention layer names must be unique, repeated: {dup}")
        if not specs:
            raise ValueError("QKClip: no attention layers given")
        self._layers: dict[str, _Layer] = {}
        offset = 0
        for spec in specs:
            self._layers[spec.name] = _Layer(spec, offset)
            offset += spec.n_heads
        self.n_slots = offset
        first = specs[0].weights()[0][1]
        self.device = first.device
        self._maxima = torch.full((offset,), -math.inf, dtype=torch.float32, device=self.device)
        self.process_group = self._resolve_group(specs, process_group)
        for layer in self._layers.values():
            for key, p in layer.spec.weights():
                layer.weights.append(self._local_rows(layer.spec, key, p))
        self.last_stats: dict = {}
        self.handles: list = []  # hooks that feed or run it (forward pre-hooks, step post-hook)

    def remove(self) -> None:
        """Detach every hook in ``handles``."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # -- set-up ------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_group(specs, process_group):
        if process_group is not None or not dist.is_available() or not dist.is_initialized():
            return process_group
        from torch.distributed.tensor import DTensor

        params = [(s.name, k, p) for s in specs for k, p in s.weights()]
        meshes = {id(p.device_mesh): (n, k, p.device_mesh) for n, k, p in params if isinstance(p, DTensor)}
        if not meshes:
            return dist.group.WORLD
        if len(meshes) != 1 or any(not isinstance(p, DTensor) for _, _, p in params):
            raise ValueError(
                "QKClip: attention weights live on different device meshes (or mix DTensors and "
                "plain tensors); pass process_group= (the data-parallel ranks)"
            )
        name, key, mesh = next(iter(meshes.values()))
        if mesh.ndim == 1:
            return mesh.get_group()
        if mesh.size() == dist.get_world_size():
            return dist.group.WORLD
        raise ValueError(
            f"QKClip: {name}.{key} is on a {mesh.ndim}-D mesh {tuple(mesh.mesh.shape)} that is not the "
            "whole world; pass process_group= (the ranks that see different data)"
        )

    def _local_rows(self, spec: AttentionSpec, key: str, p: torch.Tensor) -> _Weight:
        from torch.distributed.tensor import DTensor

        if isinstance(p, DTensor):
            from dist_marsm.layouts import dtensor_layout

            layout = dtensor_layout(p)
            rank = dist.get_rank()
            if rank not in layout.ranks:
                raise ValueError(f"QKClip: rank {rank} holds no part of {spec.name}.{key} (mesh ranks {layout.ranks})")
            rows = layout.blocks[layout.ranks.index(rank)][0]
            local = p.to_local()
            if isinstance(rows, slice):
                rows = torch.arange(rows.start, rows.stop)
        else:
            local = p
            rows = torch.arange(p.shape[0])
        if local.shape[0] != rows.numel():
            raise ValueError(
                f"QKClip: {spec.name}.{key}: local shard has {local.shape[0]} rows but its layout says {rows.numel()}"
            )
        return _Weight(p, spec.row_codes(key, rows).to(local.device))

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`apply` after every ``optimizer.step()`` (torch's step post-hook); returns the handle."""
        self.handles.append(optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: self.apply()))
        return self.handles[-1]

    # -- per step ------------------------------------------------------------------------------------

    def record(self, name: str, max_logits: torch.Tensor) -> None:
        """Fold one forward pass's per-head maxima (``[n_heads]``) of layer ``name`` into the step's."""
        layer = self._layers.get(name)
        if layer is None:
            raise KeyError(f"QKClip.record: unknown attention layer {name!r}; known: {list(self._layers)[:4]}...")
        n = layer.spec.n_heads
        if max_logits.shape != (n,):
            raise ValueError(
                f"QKClip.record({name!r}): expected {n} per-head maxima, got shape {tuple(max_logits.shape)}"
            )
        view = self._maxima[layer.offset : layer.offset + n]
        torch.maximum(view, max_logits.detach().to(view.device, torch.float32), out=view)

    @torch.no_grad()
    def apply(self) -> dict:
        """Combine the step's maxima across ranks (one MAX all-reduce), rescale, reset; returns the stats.

        Stats: ``heads_clipped``, ``max_logit`` (largest over all layers and ranks, before clipping;
        -inf when nothing was recorded), ``max_logit_per_layer``, ``allreduce_bytes``.
        """
        maxima = self._maxima
        nbytes = 0
        if self.process_group is not None:
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.process_group)
            nbytes = maxima.numel() * maxima.element_size()
        host = maxima.to("cpu", copy=True)
        tau = self.settings.tau
        clipped = 0
        per_layer = {}
        for name, layer in self._layers.items():
            spec = layer.spec
            s = host[layer.offset : layer.offset + spec.n_heads]
            per_layer[name] = float(s.max())
            if tau is None:
                continue
            over = s > tau
            if not bool(over.any()):
                continue
            clipped += int(over.sum())
            gamma = torch.where(over, tau / s.double(), torch.ones((), dtype=torch.float64))
            group = spec.n_heads // spec.n_kv_heads
            if group == 1:
                q_factor = k_factor = gamma.sqrt()
            else:  # a shared key head stays; the query head takes the whole factor
                q_factor, k_factor = gamma, torch.ones(spec.n_kv_heads, dtype=torch.float64)
            table = torch.cat([q_factor, k_factor, torch.ones(1, dtype=torch.float64)]).to(torch.float32)
            # a factor of exactly 1.0 leaves a row bitwise unchanged (x * 1.0 == x in IEEE arithmetic)
            for w in layer.weights:
                local = w.local()
                if local.shape[0] != w.codes.numel():
                    raise RuntimeError(
                        f"QKClip: {name}: local rows changed from {w.codes.numel()} to {local.shape[0]} "
                        "(parameters resharded?); build a new QKClip"
                    )
                if local.numel():
                    local.mul_(table.to(local.device)[w.codes].unsqueeze(1))
        maxima.fill_(-math.inf)
        self.last_stats = {
            "heads_clipped": clipped,
            "max_logit": float(host.max()) if host.numel() else -math.inf,
            "max_logit_per_layer": per_layer,
            "allreduce_bytes": nbytes,
        }
        return self.last_stats
