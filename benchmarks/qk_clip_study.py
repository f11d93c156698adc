"""Loss and max attention logit with QK-clip off and on, and with per-head Newton-Schulz: torchtitan's
llama3 debugmodel with MARS-M.

    python benchmarks/qk_clip_study.py [--steps 200] [--taus 2,8] [--head-dims 16] [--seed 0] [--name N]

One process, one thread, the CPU recipe's model and hyperparameters (recipes/debug_cpu.toml: batch 4 x
256 tokens of the embedded corpus, MARS-M lr 6e-3 with 8 warm-up steps and cosine decay to 0.1x, weight
decay 0.01, float32 Newton-Schulz, gradient-norm clip 1.0), torchtitan's own initialization. Both runs
measure the per-head max logits with the same hooks; "off" is tau=None (measured, never clipped).
``--head-dims`` adds unclipped runs whose q/k/v are orthogonalized per head (``ns_head_dim``).
Writes benchmarks/results/<name>.{json,md} and docs/<name>.png (name: qk_clip_study, or with --name).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import markdown_table, save  # noqa: E402

from dist_marsm import MARSM, build_param_groups  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def token_stream(split: str) -> torch.Tensor:
    from tokenizers import Tokenizer

    from dist_marsm.titan.corpus import EOS_TOKEN, documents, tokenizer_dir

    tok = Tokenizer.from_file(str(Path(tokenizer_dir(2048)) / "tokenizer.json"))
    eos = tok.token_to_id(EOS_TOKEN)
    ids = []
    for doc in documents(split):
        ids += tok.encode(doc).ids + [eos]
    return torch.tensor(ids)


def batches(stream, step, batch, seq, seed):
    g = torch.Generator().manual_seed(seed * 100003 + step)
    starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=g)
    return torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])


def build_model(seed):
    from torchtitan.models.llama3 import model_registry

    from dist_marsm.titan.cpu_shims import use_causal_sdpa

    spec = model_registry("debugmodel", attn_backend="flex")
    use_causal_sdpa(spec.model)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = spec.model.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_states(buffer_device=torch.device("cpu"))
    return model


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))


def run(tau, args, train, val, head_dim=None):
    from dist_marsm.titan.qk_clip_hooks import install_qk_clip

    model = build_model(args.seed)
    opt = MARSM(
        build_param_groups(model, head_dim=head_dim),
        lr=6e-3,
        weight_decay=0.01,
        momentum=0.95,
        gamma=0.025,
        variant="approx",
        ns_dtype="float32",
        wire_dtype="float32",
    )
    warm, floor = 8, 0.1

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    hooks = install_qk_clip(model, tau)
    log = []
    t0 = time.time()
    for step in range(args.steps):
        loss = lm_loss(model, batches(train, step, 4, 256, args.seed))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        stats = hooks.apply()
        log.append(
            dict(step=step + 1, loss=loss.item(), max_logit=stats["max_logit"], heads_clipped=stats["heads_clipped"])
        )
        if step % 10 == 0 or step == args.steps - 1:
            print(
                f"tau={tau} step {step + 1} loss {loss.item():.4f} max_logit {stats['max_logit']:.2f} "
                f"clipped {stats['heads_clipped']} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    model.eval()
    with torch.no_grad():
        val_loss = sum(lm_loss(model, batches(val, 10_000 + i, 4, 256, args.seed)).item() for i in range(8)) / 8
    hooks.remove()
    return dict(tau=tau, head_dim=head_dim, log=log, val_loss=val_loss, seconds=time.time() - t0)


def _label(r) -> str:
    label = "QK-clip off" if r["tau"] is None else f"QK-clip tau={r['tau']:g}"
    return label + (f", per-head NS ({r['head_dim']} rows)" if r.get("head_dim") else "")


def plot(results, taus, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        label = _label(r)
        steps = [e["step"] for e in r["log"]]
        a.plot(steps, [e["max_logit"] for e in r["log"]], label=label)
        b.plot(steps, [e["loss"] for e in r["log"]], label=label)
    for tau in taus:
        a.axhline(tau, color="gray", ls=":", lw=1)
    a.set(xlabel="step", ylabel="max pre-softmax logit (all layers, heads)", title="max attention logit")
    b.set(xlabel="step", ylabel="training loss", title="training loss", yscale="log")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("llama3 debugmodel, MARS-M, CPU recipe hyperparameters, one seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--taus", default="2,8", help="comma-separated thresholds; an unclipped run always comes first")
    ap.add_argument("--head-dims", default="", help="comma-separated ns_head_dim values for extra unclipped runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="qk_clip_study")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, val = token_stream("train"), token_stream("validation")
    taus = [float(t) for t in args.taus.split(",") if t]
    head_dims = [int(h) for h in args.head_dims.split(",") if h]
    results = (
        [run(None, args, train, val)]
        + [run(t, args, train, val) for t in taus]
        + [run(None, args, train, val, head_dim=h) for h in head_dims]
    )
    rows = []
    for r in results:
        log = r["log"]
        rows.append(
            [
                _label(r),
                max(e["max_logit"] for e in log),
                log[-1]["max_logit"],
                sum(e["heads_clipped"] for e in log),
                sum(e["loss"] for e in log[-10:]) / 10,
                r["val_loss"],
                r["seconds"],
            ]
        )
    md = (
        f"llama3 debugmodel, MARS-M (CPU recipe hyperparameters), {args.steps} steps, batch 4 x 256, seed "
        f"{args.seed} (one seed: differences below the seed-to-seed spread are not evidence), 1 process, "
        "1 thread, under load.\n\n"
    )
    md += markdown_table(
        [
            "run",
            "max logit (run)",
            "max logit (last step)",
            "head-clips (sum over steps)",
            "train loss (last 10)",
            "val loss (8 batches)",
            "seconds",
        ],
        rows,
    )
    print(md)
    plot(results, taus, ROOT / "docs" / ("qk_clip.png" if args.name == "qk_clip_study" else f"{args.name}.png"))
    save(args.name, {"args": vars(args), "results": results}, md)


if __name__ == "__main__":
    main()
