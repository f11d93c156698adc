"""The MARS-M step as functions over the step plan (layer 3), in the manner of torch.optim's ``adamw()``.

One step of a flat group, in order (names as below)::

    stage_gradients    c = g + gamma*beta/(1-beta)*(g - g_prev) on local blocks (foreach), 2-D views' norms
    (guard)            the one float64 all-reduce: squared norms, flags, digests; one read-back to the host
    clip_gradients     c /= max(1, ||c||_F) with the global norms
    update_momentum    m = beta*m + (1-beta)*c (or the one-buffer 'efficient' form): the Newton-Schulz inputs
    orthogonalize      owners gather their matrices, run Newton-Schulz, scatter the results (collectives.py)
    neuron_normalize   NorMuon's row normalization (only groups with normalize='neuron')
    apply_updates      W *= 1 - lr*wd;  W -= lr * scale * update;  g_prev = g
    adamw_route        torch's functional AdamW for the parameters routed to it

The element-wise math is :mod:`dist_marsm.mars_math` (tensors in, tensors out, ready for torch.compile);
nothing here reads a tensor back to the host except the guard's planned read-back and clipping's use of it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.optim.adamw import adamw as functional_adamw

from dist_marsm import mars_math
from dist_marsm.layouts import index_len
from dist_marsm.step_plan import AdamWParam, FlatGroup, MatrixParam, is_dtensor, local, state_dtype


class PhaseTimer:
    """Wall time per phase of a step, when asked for (a GPU is synchronised at each mark, so that a phase's
    time is its own and not the queue's; that is why it is off by default)."""

    def __init__(self, enabled: bool, device: torch.device | None = None):
        self.enabled = enabled
        self.sync = enabled and device is not None and device.type == "cuda"
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now


@dataclass
class Staged:
    """A flat group's gradients after the stage: what the rest of the step reads."""

    present: list[int]  # positions in fg.matrices of the matrices with a gradient
    states: dict[int, dict]  # position -> the optimizer state of that matrix (looked up once per step)
    corrected: dict[int, torch.Tensor]  # position -> corrected gradient, this rank's block
    adamw_present: list[int] = field(default_factory=list)  # positions in fg.adamw with a gradient


# ------------------------------------------------------------------ stage
def _as_block(t: torch.Tensor, m: MatrixParam) -> torch.Tensor:
    """This rank's tensor of ``m``'s parameter (a gradient, a previous gradient) as ``m``'s block, in its
    state dtype: a view of ``t`` where nothing is to change."""
    if m.reshaped:
        t = t.reshape(m.block_shape)
    return t if t.dtype == m.state_dtype else t.to(m.state_dtype)


def corrected_gradients(fg: FlatGroup, param_groups: list[dict], state, prev_grads: dict):
    """c = g + gamma * beta / (1 - beta) * (g - g_prev) per matrix with a gradient, one foreach call per
    setting; returns (positions with a gradient, their states, their corrected gradients)."""
    present, states, corrected, batches = [], {}, {}, defaultdict(list)
    # Settings are per param group: read once per step, not once per matrix.
    correction = {
        gi: (g["gamma"], g["momentum"]) if g["variant"] != "efficient" and g["gamma"] != 0 else None
        for gi, g in enumerate(param_groups)
    }
    for pos, m in enumerate(fg.matrices):
        grad = m.param.grad
        if grad is None:
            continue
        grad = local(grad)
        if grad.is_sparse:
            raise ValueError(f"MARSM: parameter {m.name} has a sparse gradient; MARSM needs dense gradients")
        present.append(pos)
        st = states[pos] = state[m.param]
        grad = _as_block(grad, m)
        key = correction[m.group_index]
        if key is None:
            corrected[pos] = grad
            continue
        prev = prev_grads.get(m.param) if prev_grads else None
        if prev is None:
            prev = st.get("prev_grad")
        if prev is not None:
            prev = _as_block(local(prev), m)
        batches[(*key, prev is not None)].append((pos, grad, prev))
    for (gamma, beta, has_prev), items in batches.items():
        out = mars_math.mars_corrections(
            [g for _, g, _ in items], [p for _, _, p in items] if has_prev else None, gamma, beta
        )
        corrected.update((pos, c) for (pos, _, _), c in zip(items, out))
    return present, states, corrected


def stage_gradients(fg: FlatGroup, param_groups: list[dict], state, prev_grads: dict, header: list[float]) -> Staged:
    """Corrected gradients of this rank's matrices, and the numbers of the step's all-reduce (with the
    guard's ``header``) written into ``fg.reduce_buffer``, ready to be reduced."""
    present, states, corrected = corrected_gradients(fg, param_groups, state, prev_grads)
    adamw_present = [k for k, a in enumerate(fg.adamw) if a.param.grad is not None]
    views, view_owner = [], []
    for pos in present:
        c = corrected[pos]
        if c.ndim == 2:
            views.append(c)
            view_owner.append(pos)
        else:
            mats = c.reshape(-1, *c.shape[-2:]).unbind(0)
            views.extend(mats)
            view_owner.extend([pos] * len(mats))
    adamw_grads = [local(fg.adamw[k].param.grad) for k in adamw_present]
    sparse = [k for k, g in zip(adamw_present, adamw_grads) if g.is_sparse]
    dense = views + [g for g in adamw_grads if not g.is_sparse] if sparse else views + adamw_grads
    _write_gradient_numbers(
        fg,
        present,
        adamw_present,
        sparse,
        view_owner,
        frobenius_norms(dense),
        header,
    )
    return Staged(present, states, corrected, adamw_present)


def frobenius_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's Frobenius norm, in one float64 vector, finite for every finite tensor.

    On CPU, foreach runs one kernel per tensor and a float64 result costs twice a float32 one, so float32
    and lower tensors are normed in float32 and only a norm that overflowed (a finite tensor whose norm
    exceeds float32's range) is recomputed in float64; reading that flag back is free on CPU. Elsewhere
    the foreach kernel is fused and float64 directly costs nothing extra.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    if tensors[0].device.type != "cpu" or any(t.dtype == torch.float64 for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).double()
    overflowed = torch.isinf(norms).nonzero().flatten().tolist()
    for i in overflowed:
        norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)
    return norms


def _write_gradient_numbers(fg: FlatGroup, present, adamw_present, sparse, view_owner, norms, header) -> None:
    """Squared norms (first replica only), presence, sparse and non-finite flags, replicas' norms, and the
    guard's ``header`` values, into the reduce buffer (one host-to-device copy for every flag)."""
    layout, values = fg.reduce_layout, fg.reduce_buffer
    n_mats, n_params = len(fg.matrices), len(fg.matrices) + len(fg.adamw)
    values.zero_()
    host = [0.0] * (3 * n_params)
    for pos in present:
        host[pos] = 1.0
    for k in adamw_present:
        host[n_mats + k] = 1.0
    for k in sparse:
        host[2 * n_params + n_mats + k] = 1.0
    values[layout.has_grad.start :].copy_(torch.tensor(host + header, dtype=torch.float64))
    if not len(norms):
        return
    stacked = norms
    mat_norms = stacked[: len(view_owner)]
    counted = [i for i, pos in enumerate(view_owner) if fg.matrices[pos].first_replica]
    if counted:
        everyone = len(counted) == len(view_owner) and len(present) == n_mats
        slots = (
            fg.all_slots
            if everyone
            else torch.cat([fg.matrices[pos].slots for pos in present if fg.matrices[pos].first_replica])
        )
        contrib = mat_norms if len(counted) == len(view_owner) else mat_norms[counted]
        values.index_add_(0, slots + layout.sq_norms.start, contrib.square())
    complete = len(present) == n_mats and len(adamw_present) == len(fg.adamw) and not sparse
    view_params = (
        fg.view_params
        if complete
        else torch.tensor(
            view_owner + [n_mats + k for k in adamw_present if k not in sparse], dtype=torch.long, device=values.device
        )
    )
    values.index_add_(0, view_params + layout.nonfinite.start, (~torch.isfinite(stacked)).double())
    if complete and fg.replica_views.numel():
        replica = stacked[fg.replica_views]
        values[layout.replica_norms] = replica
        values[layout.replica_sq] = replica.square()


# ------------------------------------------------------------------ momentum and Newton-Schulz
def clip_gradients(fg: FlatGroup, staged: Staged, param_groups: list[dict], sq_norms: list[float]) -> None:
    """Scale each corrected gradient (each matrix of a batch) to Frobenius norm <= 1, one foreach call.

    Only matrices with a squared norm above 1 are touched; on most steps that is none of them."""
    over = {s for s, sq in enumerate(sq_norms) if sq > 1.0}
    if not over:
        return
    tensors, scales = [], []
    for pos in staged.present:
        m = fg.matrices[pos]
        if over.isdisjoint(m.slot_list):
            continue
        group = param_groups[m.group_index]
        if not group["clip"] or group["variant"] == "efficient":
            continue
        c = staged.corrected[pos]
        if c.data_ptr() == local(m.param.grad).data_ptr():
            c = staged.corrected[pos] = c.clone()  # never scale the gradient itself
        mats = [c] if c.ndim == 2 else c.reshape(-1, *c.shape[-2:]).unbind(0)
        for mat, s in zip(mats, m.slot_list):
            if s in over:
                tensors.append(mat)
                scales.append(mars_math.unit_clip_factor(sq_norms[s]))
    if tensors:
        torch._foreach_mul_(tensors, scales)


def init_mars_state(p: torch.Tensor, group: dict, state: dict) -> None:
    dtype = state_dtype(p)
    state["step"] = torch.tensor(0.0)
    state["momentum"] = torch.zeros_like(p, dtype=dtype)
    if group["variant"] == "approx" and group["gamma"] != 0:  # gamma = 0 (Muon) never reads it
        state["prev_grad"] = torch.zeros_like(p, dtype=dtype)
    if group["normalize"] == "neuron":
        state["row_second_moment"] = _row_state_like(p, dtype)
    if group["variant"] == "exact":
        state["prev_param"] = p.detach().clone()


def update_momentum(fg: FlatGroup, staged: Staged, param_groups: list[dict]) -> dict[int, torch.Tensor]:
    """The momentum update of every matrix with a gradient; returns the Newton-Schulz inputs by position."""
    inputs, lerps, efficient = {}, defaultdict(list), defaultdict(list)
    for pos, c in staged.corrected.items():
        m = fg.matrices[pos]
        st = staged.states[pos]
        group = param_groups[m.group_index]
        if "step" not in st:
            init_mars_state(m.param, group, st)
        momentum = local(st["momentum"])
        if m.reshaped:
            momentum = momentum.view(c.shape)
        if group["variant"] == "efficient":
            efficient[(group["momentum"], group["gamma"])].append((pos, momentum, c))
        else:
            lerps[group["momentum"]].append((momentum, c))
            inputs[pos] = momentum
    for beta, items in lerps.items():
        mars_math.momentum_updates([m for m, _ in items], [c for _, c in items], beta)
    for (beta, gamma), items in efficient.items():
        ns_in = mars_math.efficient_momentum_updates([m for _, m, _ in items], [c for _, _, c in items], beta, gamma)
        inputs.update((pos, x) for (pos, _, _), x in zip(items, ns_in))
    return inputs


def orthogonalize(fg: FlatGroup, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """This rank's block of Newton-Schulz(full matrix) for every input, through the owner plan."""
    return _assemble(fg, fg.engine.run(_unit_inputs(fg, inputs)), inputs)


def _unit_inputs(fg: FlatGroup, inputs: dict) -> dict:
    """Each plan unit's block of this rank's inputs (a view where the unit is the whole local block)."""
    out, me = {}, fg.my_rank
    for pos, x in inputs.items():
        m = fg.matrices[pos]
        if m.whole_unit is not None:
            out[m.whole_unit] = x
            continue
        for slot in m.units:
            u = slot.unit
            if slot.empty is not None:
                out[slot.entry] = slot.empty.to(x.dtype) if slot.empty.dtype != x.dtype else slot.empty
            elif u.lead_pos is None:
                shape = [index_len(i) for i in u.layout.blocks[me]]
                out[slot.entry] = x if list(x.shape) == shape else x.reshape(shape)
            else:
                out[slot.entry] = x.reshape(-1, *x.shape[-2:])[u.lead_pos[:, None], u.row_pos]
    return out


def _assemble(fg: FlatGroup, unit_outputs: dict, inputs: dict) -> dict:
    """This rank's block of every matrix's update, put together from its units' results."""
    outputs = {}
    for pos in inputs:
        m = fg.matrices[pos]
        if m.whole_unit is not None:
            outputs[pos] = unit_outputs[m.whole_unit]
            continue
        if len(m.units) == 1 and m.units[0].unit.lead_pos is None:
            outputs[pos] = unit_outputs[m.units[0].entry]
            continue
        parts = [(s.unit, unit_outputs[s.entry]) for s in m.units if s.empty is None]
        if len(parts) == 1 and parts[0][0].lead_pos is None:
            outputs[pos] = parts[0][1].reshape(m.block_shape)
            continue
        dtype = parts[0][1].dtype if parts else fg.engine.wire_dtype
        full = torch.empty(m.block_shape, dtype=dtype, device=fg.device)
        rows = full.view(-1, *m.block_shape[-2:])
        for u, result in parts:
            rows[u.lead_pos[:, None], u.row_pos] = result.to(full.dtype)
        outputs[pos] = full
    return outputs


def neuron_normalize(fg: FlatGroup, staged: Staged, outputs: dict, param_groups: list[dict], all_reduce) -> None:
    """NorMuon on the local rows after the scatter, then one all-reduce for the RMS-restoring rescale.

    Rows are output neurons; FSDP2 shards them (Shard(0)), so the row state lives with the rows and
    only two squared Frobenius norms per matrix travel. Convention (NorMuon, Li et al. 2025, and its
    modded-nanogpt code): O' = O / (sqrt(v) + eps), then O' *= ||O||_F / ||O'||_F.
    """
    positions = [pos for pos in outputs if param_groups[fg.matrices[pos].group_index]["normalize"] == "neuron"]
    if not positions:
        return
    n = fg.num_slots
    sums = torch.zeros(2 * n, dtype=torch.float32, device=fg.device)
    normalized = {}
    for pos in positions:
        m = fg.matrices[pos]
        o = outputs[pos].float()
        v = local(staged.states[pos]["row_second_moment"]).view(*o.shape[:-1], 1)
        o_n = mars_math.neuron_normalize(o, v, param_groups[m.group_index]["normuon_beta2"], 1e-8)
        normalized[pos] = o_n
        if m.first_replica:
            sums[:n].index_add_(0, m.slots, o.square().sum(dim=(-2, -1)).reshape(-1))
            sums[n:].index_add_(0, m.slots, o_n.square().sum(dim=(-2, -1)).reshape(-1))
    all_reduce(sums)
    ratio = (sums[:n] / sums[n:].clamp_min(1e-20)).sqrt()
    for pos, o_n in normalized.items():
        outputs[pos] = o_n * ratio[fg.matrices[pos].slots].view(*o_n.shape[:-2], 1, 1)


# ------------------------------------------------------------------ apply
def apply_updates(fg: FlatGroup, staged: Staged, outputs: dict, param_groups: list[dict]) -> None:
    """Keep what the next step reads, then W *= 1 - lr * wd; W -= lr * scale * update, grouped by value."""
    prev_dst, prev_src, param_dst, param_src, steps = [], [], [], [], []
    update = defaultdict(lambda: ([], []))
    # Settings are per param group: read once per step, not once per matrix.
    keeps = {
        gi: (g["variant"] == "approx" and g["gamma"] != 0, g["variant"] == "exact") for gi, g in enumerate(param_groups)
    }
    for pos, u in outputs.items():
        m = fg.matrices[pos]
        st, local_p = staged.states[pos], local(m.param)
        keep_grad, keep_param = keeps[m.group_index]
        if keep_grad:
            prev = st.get("prev_grad")
            if prev is None:  # gamma raised from 0 mid-run: the correction starts now
                prev = st["prev_grad"] = torch.zeros_like(m.param, dtype=m.state_dtype)
            prev_dst.append(local(prev))
            prev_src.append(local(m.param.grad))
        if keep_param:
            if "prev_param" not in st:  # switched to exact mid-run
                st["prev_param"] = m.param.detach().clone()
            param_dst.append(local(st["prev_param"]))
            param_src.append(local_p)
        steps.append(st["step"])
        if u.shape != local_p.shape:  # a unit's result may carry a leading dim the parameter lacks
            u = u.reshape(local_p.shape)
        key = (m.group_index, m.lr_scale, u.dtype)
        update[key][0].append(local_p)
        update[key][1].append(u)
    foreach_copy(prev_dst, prev_src)
    foreach_copy(param_dst, param_src)
    for (group_index, scale, _), (params, updates) in update.items():
        group = param_groups[group_index]
        mars_math.apply_updates(params, updates, group["lr"], group["weight_decay"], scale)
    if steps:
        # 1 is exact in every dtype: a float32 0-dim tensor serves them all (see mars_math.foreach_scalar).
        one = torch.tensor(1.0) if steps[0].device.type == "cpu" else 1.0
        torch._foreach_add_(steps, one, alpha=1.0)


def adamw_route(items: list[AdamWParam], param_groups: list[dict], state, exact: bool) -> None:
    """torch's own functional AdamW (foreach), one call per distinct setting."""
    by_setting, rewind_dst, rewind_src = defaultdict(list), [], []
    for a in items:
        p, st = a.param, state[a.param]
        group = param_groups[a.group_index]
        if exact:  # the exact variant rewinds the whole model, AdamW-routed parameters too
            if "prev_param" not in st:
                st["prev_param"] = p.detach().clone()
            else:
                rewind_dst.append(local(st["prev_param"]))
                rewind_src.append(local(p))
        if "step" not in st:
            dtype = state_dtype(p)
            st.update(
                step=torch.tensor(0.0),
                exp_avg=torch.zeros_like(p, dtype=dtype),
                exp_avg_sq=torch.zeros_like(p, dtype=dtype),
            )
        by_setting[(group["lr"], group["adamw_betas"], group["adamw_eps"], group["weight_decay"])].append(p)
    foreach_copy(rewind_dst, rewind_src)
    for (lr, (beta1, beta2), eps, wd), params in by_setting.items():
        locals_ = [local(p) for p in params]
        master = [t.float() if t.dtype != state_dtype(t) else t for t in locals_]
        grads = [local(p.grad) for p in params]
        grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, master)]
        functional_adamw(
            master,
            grads,
            [local(state[p]["exp_avg"]) for p in params],
            [local(state[p]["exp_avg_sq"]) for p in params],
            [],
            [state[p]["step"] for p in params],
            foreach=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=wd,
            eps=eps,
            maximize=False,
        )
        for t, m in zip(locals_, master):
            if t is not m:
                t.copy_(m)


def foreach_copy(dst: list, src: list) -> None:
    if dst:
        torch._foreach_copy_(dst, src)


def _row_state_like(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Zeros with one value per row ([..., rows, 1]), sharded like the parameter's rows."""
    if not is_dtensor(p):
        return torch.zeros(*p.shape[:-1], 1, dtype=dtype, device=p.device)
    from torch.distributed.tensor import DTensor

    shard = local(p)
    shape = (*p.shape[:-1], 1)
    return DTensor.from_local(
        torch.zeros(*shard.shape[:-1], 1, dtype=dtype, device=shard.device),
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),
    )
