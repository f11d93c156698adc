"""The communication that carries out an owner plan (layer 2).

Per bucket of matrices, two all_to_all_single calls on the flat group: *gather* (each rank sends
its block of every matrix to that matrix's owner, if it is in the owner's replica) and *scatter*
(each owner sends every rank its block of the orthogonalized result). The gather of bucket k+1 is
in flight while bucket k is orthogonalized, and scatters complete asynchronously. A rank's own
block never travels. Bytes sent are counted from the split sizes, not estimated.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import torch
import torch.distributed as dist

from dist_marsm.layouts import block_numel, index_len, put_block, take_block
from dist_marsm.newton_schulz import orthogonalize_many, resolve_coefficients, resolve_dtype
from dist_marsm.owner_plan import GroupPlan, MatrixEntry

_GROUPS: dict[tuple[int, ...], object] = {}


def flat_group(ranks: tuple[int, ...], mesh=None):
    """A process group over exactly ``ranks`` (sorted; cached).

    WORLD when it spans every rank, a 1-D mesh's own group, else a new group of the members only.
    """
    if len(ranks) == 1:
        return None
    if len(ranks) == dist.get_world_size() and ranks == tuple(range(len(ranks))):
        return dist.group.WORLD
    if mesh is not None and mesh.ndim == 1:
        return mesh.get_group()
    if ranks not in _GROUPS:
        # Only the member ranks call this; pipeline stages with different meshes never meet here.
        _GROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _GROUPS[ranks]


def all_reduce_sum(values: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def all_gather_objects(obj, group, world: int) -> list:
    if group is None:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _orthogonalize_batched(fulls: dict[int, torch.Tensor], entries: list[MatrixEntry]) -> dict[int, torch.Tensor]:
    """Newton-Schulz on every full matrix, with each entry's settings; the math layer decides how
    (stacking same-shape matrices, method fallback)."""
    by_settings: dict[tuple, list[int]] = defaultdict(list)
    for pos in fulls:
        e = entries[pos]
        coefficients = e.ns_coefficients
        key = coefficients if isinstance(coefficients, str) else resolve_coefficients(coefficients, e.ns_steps)
        by_settings[(e.ns_steps, e.ns_dtype, e.ns_method, key)].append(pos)
    out = {}
    for (steps, dtype, method, _), positions in by_settings.items():
        results = orthogonalize_many(
            [fulls[p] for p in positions],
            steps,
            resolve_dtype(dtype),
            method=method,
            coefficients=entries[positions[0]].ns_coefficients,
        )
        out.update(zip(positions, results))
    return out


class OwnerCompute:
    """Executes one GroupPlan per step: local blocks of momentum in, local blocks of updates out.

    Per step it counts ``bytes_sent`` / ``bytes_received`` (from the split sizes), ``collectives`` (the
    all_to_all_single calls), ``ns_matrices``, and ``peak_transient_bytes``: the most bytes held at once in
    gathered matrices, their results and the send / receive buffers of gathers and of scatters still in
    flight (this rank's own blocks of the updates, the step's output, are not counted). At most one bucket's
    gathered matrices and results, the next bucket's gather and one scatter are alive at a time, so the
    peak is bounded by a few buckets (docs/scale.md), whatever the world size and however many buckets
    this rank owns.
    """

    def __init__(self, plan: GroupPlan, wire_dtype: torch.dtype):
        self.plan = plan
        self.wire_dtype = wire_dtype
        self.bytes_sent = 0
        self.bytes_received = 0
        self.collectives = 0
        self.ns_matrices = 0
        self.peak_transient_bytes = 0
        self._live_bytes = 0
        self.device = torch.device("cpu")

    def _hold(self, nbytes: int) -> None:
        self._live_bytes += nbytes
        self.peak_transient_bytes = max(self.peak_transient_bytes, self._live_bytes)

    def run(self, local_inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``local_inputs`` maps entry position -> this rank's block (shape of its layout block).

        Returns the same positions mapped to this rank's block of Newton-Schulz(full matrix).
        """
        plan = self.plan
        self.bytes_sent = self.bytes_received = self.collectives = self.ns_matrices = 0
        self.peak_transient_bytes = self._live_bytes = 0
        outputs: dict[int, torch.Tensor] = {}
        if plan.world == 1:  # every block is its whole matrix: nothing to gather, scatter or bucket
            outputs = _orthogonalize_batched(local_inputs, plan.entries)
            self.ns_matrices = sum(plan.entries[p].num_matrices for p in outputs)
            return outputs
        buckets = [[p for p in b if p in local_inputs] for b in plan.buckets]
        buckets = [b for b in buckets if b]
        if not buckets:
            return outputs
        self.device = next(iter(local_inputs.values())).device
        gather = self._start_gather(buckets[0], local_inputs)
        in_flight = None
        for k, bucket in enumerate(buckets):
            fulls = self._finish_gather(bucket, local_inputs, gather)
            if k + 1 < len(buckets):
                gather = self._start_gather(buckets[k + 1], local_inputs)
            results = _orthogonalize_batched(fulls, plan.entries)
            self.ns_matrices += sum(plan.entries[p].num_matrices for p in results)
            self._hold(_gathered_bytes(results, local_inputs))
            if in_flight is not None:  # one scatter in flight at a time: it overlapped this bucket's NS
                self._finish_scatter(*in_flight, outputs)
            scatter = self._start_scatter(bucket, results, outputs)
            # The scatter's send buffer holds copies: the gathered matrices and their results can go.
            self._hold(-_gathered_bytes(fulls, local_inputs) - _gathered_bytes(results, local_inputs))
            del fulls, results
            in_flight = (bucket, scatter)
        self._finish_scatter(*in_flight, outputs)
        return outputs

    # -- gather: blocks of momentum to owners --------------------------------------------------
    def _start_gather(self, bucket, local_inputs):
        plan, me = self.plan, self.plan.my_rank
        send_parts: dict[int, list[torch.Tensor]] = defaultdict(list)
        send_sizes, recv_sizes = [0] * plan.world, [0] * plan.world
        for pos in bucket:
            e = plan.entries[pos]
            if e.sends_to_owner(me):
                send_parts[e.owner].append(local_inputs[pos].reshape(-1))
                send_sizes[e.owner] += block_numel(e.layout.blocks[me])
            elif e.owner == me:
                tiling = e.leading_tiling(me)
                for q, n in (
                    tiling if tiling is not None else ((q, block_numel(e.layout.blocks[q])) for q in e.senders(me))
                ):
                    if q != me:
                        recv_sizes[q] += n
        return self._exchange([t for rank in sorted(send_parts) for t in send_parts[rank]], send_sizes, recv_sizes)

    def _finish_gather(self, bucket, local_inputs, handle) -> dict[int, torch.Tensor]:
        plan, me = self.plan, self.plan.my_rank
        pieces = self._wait(handle)
        fulls = {}
        owned = sum(1 for pos in bucket if plan.entries[pos].owner == me)
        for pos in bucket:
            e = plan.entries[pos]
            if e.owner != me:
                continue
            senders = e.senders(me)
            if senders == [me]:  # this rank holds the whole matrix: nothing to assemble
                fulls[pos] = local_inputs[pos]
                continue
            # Assembled in the input's dtype: only blocks that travel are rounded to the wire dtype.
            tiling = e.leading_tiling(me)
            if tiling is not None:
                mine = local_inputs[pos].reshape(-1)
                if owned == 1:  # the receive buffer is this matrix's blocks in rank order, less this rank's
                    cut = pieces.offsets[me]
                    parts = [pieces.recv[:cut], mine, pieces.recv[cut:]]
                else:
                    parts = [mine if q == me else pieces[q].pop(n) for q, n in tiling]
                fulls[pos] = torch.cat(parts).to(mine.dtype).view(e.shape)
                continue
            full = torch.empty(e.shape, dtype=local_inputs[pos].dtype, device=local_inputs[pos].device)
            for q in senders:
                block = e.layout.blocks[q]
                values = local_inputs[pos] if q == me else pieces[q].pop(block_numel(block))
                put_block(full, block, values.reshape([index_len(i) for i in block]))
            fulls[pos] = full
        self._hold(_gathered_bytes(fulls, local_inputs))
        self._release(handle)
        return fulls

    # -- scatter: blocks of results back to every rank ----------------------------------------
    def _start_scatter(self, bucket, results, outputs):
        """Send each rank its block of the results this rank owns; this rank's own blocks go to ``outputs``."""
        plan, me = self.plan, self.plan.my_rank
        send_parts: dict[int, list[torch.Tensor]] = defaultdict(list)
        send_sizes, recv_sizes = [0] * plan.world, [0] * plan.world
        owned = [pos for pos in bucket if plan.entries[pos].owner == me]
        flat = None
        if len(owned) == 1:
            sizes = plan.entries[owned[0]].scatter_sizes()
            if sizes is not None:  # the ranks' blocks are the flat result, once per replica, in rank order
                result = results[owned[0]].reshape(-1)
                copies = sum(sizes) // result.numel()
                if sizes[me] == 0:
                    flat = [result] * copies
                else:  # this rank's own block is cut out of its replica's copy
                    copy, cut = divmod(sum(sizes[:me]), result.numel())
                    flat = [result] * copy + [result[:cut], result[cut + sizes[me] :]] + [result] * (copies - copy - 1)
                send_sizes = list(sizes)
                send_sizes[me] = 0
        for pos in bucket:
            e = plan.entries[pos]
            if e.owner == me:
                if flat is None:
                    self._split_result(e, results[pos], send_parts, send_sizes)
                block = e.layout.blocks[me]
                shape = [index_len(i) for i in block]
                mine = results[pos]
                if tuple(mine.shape) != tuple(shape):  # a copy, so that the whole result is not kept alive
                    mine = take_block(mine, block).clone()
                outputs[pos] = mine.reshape(shape)
            else:
                recv_sizes[e.owner] += block_numel(e.layout.blocks[me])
        if flat is None:
            flat = [t for rank in sorted(send_parts) for t in send_parts[rank]]
        return self._exchange(flat, send_sizes, recv_sizes)

    def _split_result(self, e: MatrixEntry, result: torch.Tensor, send_parts: dict, send_sizes: list[int]) -> None:
        """Every other rank's block of one result, as flat views where the blocks tile the leading dim."""
        me = self.plan.my_rank
        tiling = e.leading_tiling(me) if e.senders(me) == list(range(self.plan.world)) else None
        if tiling is not None:
            ranks, sizes = zip(*tiling)
            for q, n, view in zip(ranks, sizes, result.reshape(-1).split(sizes)):
                if q != me and n:
                    send_parts[q].append(view)
                    send_sizes[q] += n
            return
        for q in range(self.plan.world):
            if q != me:
                send_parts[q].append(take_block(result, e.layout.blocks[q]).reshape(-1))
                send_sizes[q] += block_numel(e.layout.blocks[q])

    def _finish_scatter(self, bucket, handle, outputs) -> None:
        plan, me = self.plan, self.plan.my_rank
        pieces = self._wait(handle)
        for pos in bucket:
            e = plan.entries[pos]
            if e.owner != me:
                block = e.layout.blocks[me]
                outputs[pos] = pieces[e.owner].pop(block_numel(block)).reshape([index_len(i) for i in block])
        # From here the receive buffer is this rank's blocks of the updates (the step's output), not transient.
        self._release(handle)

    # -- one all_to_all_single -------------------------------------------------------------
    def _exchange(self, flat: list[torch.Tensor], send_sizes: list[int], recv_sizes: list[int]):
        """Start one all_to_all_single; ``flat`` is what goes out, in destination-rank order."""
        plan = self.plan
        if plan.world == 1 or (not flat and not any(recv_sizes) and plan.group is None):
            return None, recv_sizes, None, None
        # One cast after the concatenation (cat promotes mixed inputs), not one per matrix.
        send = (
            torch.cat(flat).to(self.wire_dtype) if flat else torch.empty(0, dtype=self.wire_dtype, device=self.device)
        )
        recv = torch.empty(sum(recv_sizes), dtype=self.wire_dtype, device=self.device)
        self.bytes_sent += send.numel() * send.element_size()
        self.bytes_received += recv.numel() * recv.element_size()
        self.collectives += 1
        self._hold((send.numel() + recv.numel()) * send.element_size())
        work = dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=plan.group, async_op=True)
        return work, recv_sizes, recv, send

    def _release(self, handle) -> None:
        _, _, recv, send = handle
        if send is not None:
            self._hold(-(send.numel() + recv.numel()) * send.element_size())

    @staticmethod
    def _wait(handle) -> _Parts:
        work, recv_sizes, recv, _ = handle
        if work is not None:
            work.wait()
        return _Parts(recv, recv_sizes)


def _gathered_bytes(tensors: dict[int, torch.Tensor], local_inputs: dict[int, torch.Tensor]) -> int:
    """Bytes of the tensors that are not this rank's own inputs (a matrix it holds whole is not a copy)."""
    return sum(t.numel() * t.element_size() for pos, t in tensors.items() if t is not local_inputs.get(pos))


class _Parts(dict):
    """Per source rank: a cursor over its part of a receive buffer, made when first read (most ranks
    receive from few others, so nothing here walks the whole group in Python)."""

    def __init__(self, recv: torch.Tensor | None, recv_sizes: list[int]):
        super().__init__()
        self.recv = recv
        self.offsets = list(itertools.accumulate(recv_sizes, initial=0)) if recv is not None else None

    def __missing__(self, rank: int) -> _Cursor:
        cursor = self[rank] = _Cursor(self.recv[self.offsets[rank] : self.offsets[rank + 1]])
        return cursor


class _Cursor:
    """Reads consecutive pieces from one source rank's part of a receive buffer."""

    def __init__(self, buf):
        self.buf, self.offset = buf, 0

    def pop(self, n: int) -> torch.Tensor:
        out = self.buf[self.offset : self.offset + n]
        self.offset += n
        return out
