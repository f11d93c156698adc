"""QK-clip (issue 19): measured maxima, the cap, untouched heads, layouts, ranks, resume.

Every expectation comes from a float64 computation written here from the formula: logits
``S[b,h,i,j] = q_i . k_j / sqrt(head_dim)`` for ``j <= i`` from the layer's weights and inputs, and
the rule ``gamma_h = tau / max S_h`` applied to float64 copies of the weights (query and key rows each
by ``sqrt(gamma_h)``; under GQA the query rows by ``gamma_h`` and the shared key rows not at all).

Tolerances: the code computes in float32, so maxima agree with float64 to 2e-5 relative (sums of
``head_dim`` products of O(10) values, float32 epsilon 1.2e-7, plus one rounding of each scaled weight);
a clipped head's next maximum is ``tau`` to the same 2e-5. Rows of unclipped heads are compared with
``torch.equal``. FSDP2 training against one process: the only difference is the gradient
reduce-scatter's summation order (~1e-7 per step), so 1e-5 after 4 steps.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from _spawn import scenario, scenario_cases, scenario_check

from dist_marsm.qk_clip import AttentionSpec, QKClip, QKClipSettings, per_head_max_logits

REL = 2e-5


# ------------------------------------------------------------------ float64 references (independent)
def ref_max_logits(x, wq, wk, n_heads, n_kv, hd, causal=True):
    """[n_heads] float64: max over batch and causal pairs of q.k/sqrt(hd), from the weights and inputs."""
    x, wq, wk = x.detach().double(), wq.detach().double(), wk.detach().double()
    b, length, _ = x.shape
    q = (x @ wq.T).view(b, length, n_heads, hd)
    k = (x @ wk.T).view(b, length, n_kv, hd)
    g = n_heads // n_kv
    out = torch.empty(n_heads, dtype=torch.float64)
    for h in range(n_heads):
        s = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, h // g]) / math.sqrt(hd)
        if causal:
            s = s.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -math.inf)
        out[h] = s.max()
    return out


def ref_clip(wq, wk, maxima, tau, n_heads, n_kv, hd):
    """float64 copies of wq, wk after the QK-clip rule for per-head maxima ``maxima``."""
    wq, wk = wq.detach().double().clone(), wk.detach().double().clone()
    g = n_heads // n_kv
    for h in range(n_heads):
        if maxima[h] > tau:
            gamma = tau / float(maxima[h])
            rows = slice(h * hd, (h + 1) * hd)
            if g == 1:
                wq[rows] *= math.sqrt(gamma)
                wk[rows] *= math.sqrt(gamma)
            else:
                wq[rows] *= gamma
    return wq, wk


# ------------------------------------------------------------------ a small attention model (test-only)
class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv, hd, qk_std):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv, hd
        self.wq = nn.Linear(dim, n_heads * hd, bias=False)
        self.wk = nn.Linear(dim, n_kv * hd, bias=False)
        self.wv = nn.Linear(dim, n_kv * hd, bias=False)
        self.wo = nn.Linear(n_heads * hd, dim, bias=False)
        with torch.no_grad():
            self.wq.weight.normal_(0, qk_std)
            self.wk.weight.normal_(0, qk_std)
        self.clip: QKClip | None = None
        self.name = ""

    def forward(self, x):
        b, length, _ = x.shape
        q = self.wq(x).view(b, length, self.n_heads, self.hd)
        k = self.wk(x).view(b, length, self.n_kv, self.hd)
        v = self.wv(x).view(b, length, self.n_kv, self.hd)
        if self.clip is not None:
            self.clip.record(self.name, per_head_max_logits(q, k))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.n_heads != self.n_kv,
        )
        return self.wo(out.transpose(1, 2).reshape(b, length, -1))

    def spec(self):
        return AttentionSpec(self.name, self.n_heads, self.n_kv, self.hd, wq=self.wq.weight, wk=self.wk.weight)


# Uneven on purpose: 9 query rows (5/4 at 2 ranks: head 1 straddles), GQA 12 q / 6 k rows (heads
# straddle ranks at 3 ranks).
GEOMETRIES = [dict(n_heads=3, n_kv=3, hd=3), dict(n_heads=4, n_kv=2, hd=3)]
DIM, VOCAB, TAU = 8, 13, 3.0


class TinyLM(nn.Module):
    def __init__(self, qk_std=1.5):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Attention(DIM, **g, qk_std=qk_std) for g in GEOMETRIES])
        for i, layer in enumerate(self.layers):
            layer.name = f"layers.{i}"
        self.out = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.emb(tokens)
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h)

    def attach(self, clip):
        for layer in self.layers:
            layer.clip = clip


def make_lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def batch(step, rank, n=2, length=6):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (n, length + 1), generator=g)


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


# ------------------------------------------------------------------ single process
@pytest.mark.parametrize("geom", GEOMETRIES, ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False])
def test_per_head_max_logits_matches_float64(geom, causal):
    torch.manual_seed(1)
    nh, nkv, hd = geom["n_heads"], geom["n_kv"], geom["hd"]
    x = torch.randn(3, 7, DIM)
    wq, wk = torch.randn(nh * hd, DIM), torch.randn(nkv * hd, DIM)
    q, k = (x @ wq.T).view(3, 7, nh, hd), (x @ wk.T).view(3, 7, nkv, hd)
    ref = ref_max_logits(x, wq, wk, nh, nkv, hd, causal)
    for chunk in (1 << 24, 3 * nh * 7 * 3, 5):  # one block; blocks of 3 query rows (3, 3, 1); of 1
        got = per_head_max_logits(q, k, causal=causal, max_chunk_elements=chunk)
        torch.testing.assert_close(got.double(), ref, rtol=REL, atol=0)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=["mha", "gqa"])
def test_caps_next_forward_and_leaves_other_heads_bitwise(geom):
    torch.manual_seed(2)
    nh, nkv, hd = geom["n_heads"], geom["n_kv"], geom["hd"]
    layer = Attention(DIM, nh, nkv, hd, qk_std=0.1)
    layer.name = "attn"
    with torch.no_grad():  # query head 0 made large: its logits far above tau, the others far below
        layer.wq.weight[:hd] *= 200
    clip = QKClip([layer.spec()], QKClipSettings(tau=TAU))
    layer.clip = clip
    x = torch.randn(2, 6, DIM)
    wq0, wk0 = layer.wq.weight.detach().clone(), layer.wk.weight.detach().clone()
    before = ref_max_logits(x, wq0, wk0, nh, nkv, hd)
    assert before[0] > 10 * TAU and (before[1:] < TAU).all()  # the set-up is what the test needs
    layer(x)
    stats = clip.apply()
    assert stats["heads_clipped"] == 1
    assert stats["max_logit"] == pytest.approx(float(before.max()), rel=REL)
    after = ref_max_logits(x, layer.wq.weight.detach(), layer.wk.weight.detach(), nh, nkv, hd)
    assert float(after[0]) == pytest.approx(TAU, rel=REL)
    assert torch.equal(layer.wq.weight[hd:], wq0[hd:])  # other query heads bitwise
    expect_q, expect_k = ref_clip(wq0, wk0, before, TAU, nh, nkv, hd)
    torch.testing.assert_close(layer.wq.weight.detach().double(), expect_q, rtol=REL, atol=0)
    if nh == nkv:
        assert torch.equal(layer.wk.weight[hd:], wk0[hd:])
    else:  # the shared key head is not scaled, so heads 1..3 keep their logits exactly
        assert torch.equal(layer.wk.weight, wk0)
    torch.testing.assert_close(layer.wk.weight.detach().double(), expect_k, rtol=REL, atol=0)
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)
    # maxima were reset: a step without forward passes clips nothing and changes nothing
    w = layer.wq.weight.detach().clone()
    assert clip.apply()["heads_clipped"] == 0 and torch.equal(layer.wq.weight, w)


def test_below_tau_is_a_bitwise_no_op_and_tau_none_measures_only():
    model = make_lm()
    x = batch(0, 0)[:, :-1]
    init = [p.detach().clone() for p in model.parameters()]
    for settings in (QKClipSettings(tau=1e9), QKClipSettings()):
        clip = QKClip([layer.spec() for layer in model.layers], settings)
        model.attach(clip)
        model(x)
        stats = clip.apply()
        assert stats["heads_clipped"] == 0 and math.isfinite(stats["max_logit"]) and stats["max_logit"] > TAU
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), init))


def test_micro_batches_keep_the_running_max():
    torch.manual_seed(3)
    layer = Attention(DIM, 4, 2, 3, qk_std=1.0)
    layer.name = "attn"
    clip = QKClip([layer.spec()], TAU)
    layer.clip = clip
    xs = [torch.randn(1, 6, DIM) * s for s in (0.5, 2.0, 1.0)]
    ref = torch.stack([ref_max_logits(x, layer.wq.weight, layer.wk.weight, 4, 2, 3) for x in xs]).amax(0)
    for x in xs:
        layer(x)
    wq0, wk0 = layer.wq.weight.detach().clone(), layer.wk.weight.detach().clone()
    stats = clip.apply()
    assert stats["max_logit"] == pytest.approx(float(ref.max()), rel=REL)
    expect_q, expect_k = ref_clip(wq0, wk0, ref, TAU, 4, 2, 3)
    torch.testing.assert_close(layer.wq.weight.detach().double(), expect_q, rtol=REL, atol=0)


def test_attach_runs_apply_after_each_step():
    model = make_lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step itself changes nothing
    clip = QKClip([layer.spec() for layer in model.layers], TAU)
    model.attach(clip)
    handle = clip.attach(opt)
    x = batch(0, 0)[:, :-1]
    wq0 = model.layers[0].wq.weight.detach().clone()
    maxima = ref_max_logits(model.emb(x), wq0, model.layers[0].wk.weight, 3, 3, 3)
    model(x).sum().backward()
    opt.step()
    expect_q, _ = ref_clip(wq0, model.layers[0].wk.weight, maxima, TAU, 3, 3, 3)  # wk after: sqrt-scaled too
    torch.testing.assert_close(model.layers[0].wq.weight.detach().double(), expect_q, rtol=REL, atol=0)
    assert clip.last_stats["heads_clipped"] > 0
    handle.remove()
    x2 = x * 0 + batch(1, 0)[:, :-1]  # other tokens: some head is above tau again
    model(x2)
    assert any(v > TAU for v in clip._maxima.tolist())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))  # detached: no clip


def test_fused_qkv_rows_equal_separate():
    """torchtitan's fused layout [n_kv, g + 2, hd] rows, built here from separate wq/wk/wv."""
    torch.manual_seed(4)
    nh, nkv, hd, din = 4, 2, 3, 5
    g = nh // nkv
    wq, wk, wv = torch.randn(nh * hd, din), torch.randn(nkv * hd, din), torch.randn(nkv * hd, din)
    fused = torch.cat([wq.view(nkv, g, hd, din), wk.view(nkv, 1, hd, din), wv.view(nkv, 1, hd, din)], 1)
    fused = fused.reshape(-1, din).clone()
    maxima = torch.tensor([10.0, 1.0, 7.0, 30.0])
    sep = QKClip([AttentionSpec("a", nh, nkv, hd, wq=wq, wk=wk)], TAU)
    fus = QKClip([AttentionSpec("a", nh, nkv, hd, wqkv=fused)], TAU)
    for c in (sep, fus):
        c.record("a", maxima)
        c.apply()
    again = torch.cat([wq.view(nkv, g, hd, din), wk.view(nkv, 1, hd, din), wv.view(nkv, 1, hd, din)], 1)
    assert torch.equal(fused, again.reshape(-1, din))
    # and the MHA case, where key rows are scaled too
    wq, wk, wv = torch.randn(2 * hd, din), torch.randn(2 * hd, din), torch.randn(2 * hd, din)
    fused = torch.cat([wq.view(2, 1, hd, din), wk.view(2, 1, hd, din), wv.view(2, 1, hd, din)], 1).reshape(-1, din)
    v0 = wv.clone()
    for c in (
        QKClip([AttentionSpec("a", 2, 2, hd, wq=wq, wk=wk)], TAU),
        QKClip([AttentionSpec("a", 2, 2, hd, wqkv=fused)], TAU),
    ):
        c.record("a", torch.tensor([12.0, 2.0]))
        c.apply()
    again = torch.cat([wq.view(2, 1, hd, din), wk.view(2, 1, hd, din), v0.view(2, 1, hd, din)], 1)
    assert torch.equal(fused, again.reshape(-1, din))


def test_bad_input_errors_name_what():
    w = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="tau"):
        QKClipSettings(tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        QKClipSettings(tau=float("nan"))
    with pytest.raises(ValueError, match="tau"):
        QKClipSettings(tau=True)
    with pytest.raises(ValueError, match="wq has shape"):
        AttentionSpec("l0", 3, 3, 3, wq=w, wk=torch.zeros(9, 4))
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        AttentionSpec("l0", 3, 2, 3, wq=torch.zeros(9, 4), wk=torch.zeros(6, 4))
    with pytest.raises(ValueError, match="either wq and wk, or wqkv"):
        AttentionSpec("l0", 2, 2, 3, wq=w, wk=w, wqkv=torch.zeros(18, 4))
    clip = QKClip([AttentionSpec("l0", 2, 2, 3, wq=w, wk=w)], 1.0)
    with pytest.raises(KeyError, match="l1"):
        clip.record("l1", torch.zeros(2))
    with pytest.raises(ValueError, match="expected 2 per-head maxima"):
        clip.record("l0", torch.zeros(3))
    with pytest.raises(ValueError, match="unique"):
        QKClip([AttentionSpec("l0", 2, 2, 3, wq=w, wk=w)] * 2, 1.0)


def _train(model, opt, clip, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        tokens = batch(step, 0)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        clip.apply()
        losses.append(loss.item())
    return losses


def test_resume_equals_uninterrupted():
    """QKClip keeps nothing across steps: model + optimizer state alone resume the run exactly."""

    def fresh():
        model = make_lm()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        clip = QKClip([layer.spec() for layer in model.layers], TAU)
        model.attach(clip)
        return model, opt, clip

    model, opt, clip = fresh()
    straight = _train(model, opt, clip, 6)
    assert clip.last_stats["heads_clipped"] > 0  # the clip is active in this run
    ref = [p.detach().clone() for p in model.parameters()]

    model, opt, clip = fresh()
    first = _train(model, opt, clip, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model, opt, clip = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    second = _train(model, opt, clip, 3, start=3)
    assert first + second == straight
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref))


# ------------------------------------------------------------------ torchtitan glue
def _titan_model(kind):
    """torchtitan llama3: the debugmodel (fused QKV, 16 heads) or a tiny GQA one (8 heads, 2 KV heads)."""
    import torchtitan.models.llama3 as L

    from dist_marsm.titan.cpu_shims import use_causal_sdpa

    if kind == "debugmodel":
        config = L.model_registry("debugmodel", attn_backend="flex").model
    else:
        dim, n_heads = 64, 8
        config = L.Llama3Model.Config(
            dim=dim,
            vocab_size=2048,
            tok_embeddings=L.Embedding.Config(num_embeddings=2048, embedding_dim=dim, param_init=L._EMBEDDING_INIT),
            norm=L.RMSNorm.Config(normalized_shape=dim, param_init=L._NORM_INIT),
            lm_head=L.Linear.Config(in_features=dim, out_features=2048, param_init=L._output_linear_init(dim)),
            layers=L._build_llama3_layers(
                fuse_qkv=kind == "gqa_fused",
                n_layers=2,
                dim=dim,
                n_heads=n_heads,
                n_kv_heads=2,
                hidden_dim=L.compute_ffn_hidden_dim(dim, multiple_of=64),
                rope=L.ComplexRoPE.Config(dim=dim // n_heads, max_seq_len=1024, theta=500000, scaling="llama"),
                attn_backend="flex",
            ),
        )
    use_causal_sdpa(config)
    torch.manual_seed(5)
    model = config.build()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
        qkv = model.layers["0"].attention.qkv_linear
        for lin in (qkv.wqkv,) if hasattr(qkv, "wqkv") else (qkv.wq, qkv.wk):
            lin.weight.normal_(0, 0.5)
    return model


def _causal_max(q, k):
    """float64 per-head max of the causal logits, key head h // g for query head h (GQA)."""
    q, k = q.double(), k.double()
    g = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(g, dim=2)
    length = q.shape[1]
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    return s.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -math.inf).amax(dim=(0, 2, 3))


@pytest.mark.parametrize("kind", ["debugmodel", "gqa_fused", "gqa_separate"])
def test_titan_hooks_measure_without_changing_the_model(kind):
    pytest.importorskip("torchtitan")
    from dist_marsm.titan.qk_clip_hooks import install_qk_clip

    model = _titan_model(kind)
    attn0 = model.layers["0"].attention
    assert (attn0.n_heads == attn0.n_kv_heads) == (kind == "debugmodel")
    assert hasattr(attn0.qkv_linear, "wqkv") == (kind != "gqa_separate")
    captured = {}

    def capture(_m, args, kwargs):  # test-only: the q/k the kernel receives
        captured["q"], captured["k"], captured["scale"] = args[0].detach(), args[1].detach(), kwargs.get("scale")

    attn0.inner_attention.register_forward_pre_hook(capture, with_kwargs=True)
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = model(tokens)
    hooks = install_qk_clip(model, QKClipSettings(tau=5.0))
    assert torch.equal(model(tokens), plain)  # the hooks change nothing the model computes
    assert captured["scale"] is None  # torchtitan leaves SDPA's default 1/sqrt(head_dim)
    ref = _causal_max(captured["q"], captured["k"])
    assert ref.max() > 5.0
    stats = hooks.apply()
    assert stats["max_logit_per_layer"]["layers.0.attention"] == pytest.approx(float(ref.max()), rel=REL)
    assert stats["heads_clipped"] >= int((ref > 5.0).sum())
    model(tokens)  # layer 0's input does not depend on any attention weight: its max is now tau
    after = _causal_max(captured["q"], captured["k"])
    torch.testing.assert_close(after, torch.where(ref > 5.0, torch.full_like(ref, 5.0), ref), rtol=REL, atol=0)
    hooks.apply()
    model.eval()
    model(tokens)  # eval forwards do not record
    assert hooks.apply()["max_logit"] == -math.inf
    hooks.remove()


# ------------------------------------------------------------------ distributed (gloo ranks)
def _ranks_data(world):
    """Per rank: different tokens and a different scale, so the ranks' maxima differ."""
    return [batch(7, r)[:, :-1] for r in range(world)]


def _reference_after_one_clip(world, qk_std=1.5):
    """float64 weights after one clip with the max over ALL ranks' data (computed by every rank)."""
    model = make_lm()
    expect = {}
    h_in = {r: model.emb(x).detach() for r, x in enumerate(_ranks_data(world))}
    for layer in model.layers:
        maxima = torch.stack(
            [
                ref_max_logits(h_in[r], layer.wq.weight, layer.wk.weight, layer.n_heads, layer.n_kv, layer.hd)
                for r in range(world)
            ]
        ).amax(0)
        expect[layer.name] = ref_clip(
            layer.wq.weight, layer.wk.weight, maxima, TAU, layer.n_heads, layer.n_kv, layer.hd
        )
        with torch.no_grad():
            h_in = {r: h + layer(h) for r, h in h_in.items()}
    return expect


def _assert_matches(model, expect, equal: bool):
    diffs = []
    for layer in model.layers:
        eq, ek = expect[layer.name]
        for got, want in ((full(layer.wq.weight), eq), (full(layer.wk.weight), ek)):
            diffs.append(((got.detach().double() - want).abs() / want.abs().clamp_min(1e-3)).max().item())
    if equal:
        assert max(diffs) < REL, diffs
    else:
        assert max(diffs) > 1e-3, diffs  # some head's rows were scaled by the wrong factor


def _gathered_differ(tensors):
    """True when the ranks' copies of the tensors are not all equal."""
    world = dist.get_world_size()
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    out = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(out, flat)
    return any(not torch.equal(out[0], o) for o in out[1:])


def _singleton_groups():
    return [dist.new_group([r]) for r in range(dist.get_world_size())]


@scenario(2, 3)
def scenario_replicated(rank, world):
    """Plain replicas (as under DDP), different data per rank: one MAX all-reduce keeps them equal."""
    expect = _reference_after_one_clip(world)
    x = _ranks_data(world)[rank]
    for reduce in (True, False):
        model = make_lm()
        groups = _singleton_groups()
        clip = QKClip([layer.spec() for layer in model.layers], TAU, process_group=None if reduce else groups[rank])
        model.attach(clip)
        model(x)
        stats = clip.apply()
        qk = [t for layer in model.layers for t in (layer.wq.weight, layer.wk.weight)]
        if reduce:
            assert stats["allreduce_bytes"] == 4 * sum(g["n_heads"] for g in GEOMETRIES)
            assert not _gathered_differ(qk)
            _assert_matches(model, expect, equal=True)
        else:  # negative control: without the cross-rank max the replicas diverge
            assert _gathered_differ(qk)


@scenario(2, 3)
def scenario_fsdp_shards(rank, world):
    """FSDP2 row shards (heads straddling ranks): local rescale equals the reference; without MAX it does not."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    expect = _reference_after_one_clip(world)
    mesh = init_device_mesh("cpu", (world,))
    x = _ranks_data(world)[rank]
    for reduce in (True, False):
        model = make_lm()
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        groups = _singleton_groups()
        clip = QKClip([layer.spec() for layer in model.layers], TAU, process_group=None if reduce else groups[rank])
        model.attach(clip)
        model(x)
        clip.apply()
        _assert_matches(model, expect, equal=reduce)


@scenario(2, 3)
def scenario_fsdp_training(rank, world):
    """4 steps of FSDP2 + AdamW + QK-clip equal one process on all ranks' data (same weights everywhere)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    ref = make_lm()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_clip_ = QKClip([layer.spec() for layer in ref.layers], TAU)
    ref.attach(ref_clip_)
    model = make_lm()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    clip = QKClip([layer.spec() for layer in model.layers], TAU)
    model.attach(clip)
    clipped = 0
    for step in range(4):
        tokens = [batch(step, r) for r in range(world)]
        loss = F.cross_entropy(model(tokens[rank][:, :-1]).reshape(-1, VOCAB), tokens[rank][:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        clipped += clip.apply()["heads_clipped"]
        allt = torch.cat(tokens)
        ref_loss = F.cross_entropy(ref(allt[:, :-1]).reshape(-1, VOCAB), allt[:, 1:].reshape(-1))
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_clip_.apply()
    assert clipped > 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(full(p).detach(), q.detach(), rtol=1e-5, atol=1e-5, msg=name)


_check = scenario_check(__name__)


@pytest.mark.slow
@pytest.mark.parametrize("world,scenario", scenario_cases(__name__))
def test_distributed(world, scenario):
    _check(world, scenario)


def test_recipe_key_wires_qk_clip_into_the_optimizer_container():
    pytest.importorskip("torchtitan")
    from dist_marsm.titan.optimizer_container import MARSMOptimizersContainer

    with pytest.raises(ValueError, match="qk_clip_tau"):
        MARSMOptimizersContainer.Config(qk_clip_tau=-1.0)
    model = _titan_model("gqa_separate")
    assert MARSMOptimizersContainer(MARSMOptimizersContainer.Config(), model_parts=[model]).qk_clip is None
    container = MARSMOptimizersContainer(MARSMOptimizersContainer.Config(qk_clip_tau=5.0), model_parts=[model])
    tokens = torch.randint(0, 2048, (2, 17), generator=torch.Generator().manual_seed(0))
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
    container.step()
    stats = container.qk_clip.last_stats
    assert stats["heads_clipped"] > 0 and stats["max_logit"] > 5.0  # layer 0's q/k weights are large
