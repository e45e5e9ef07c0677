"""Does fusing an earlier layer's state into the exit head help (EAGLE-3 style)? Equal-step comparison (issue 12 item 1).

    .venv/bin/offramp bench head-fusion [--model default] [--exit-layer 15] [--fuse 10] [--steps 300]
        [--batch-tokens 1024] [--corpus-preset large] [--seed 0] [--json FILE]

Two heads train side by side on the same batches of the train split: today's residual MLP (2048 x 2) on the layer-K
state, and the same head whose input first takes a zero-initialised projection of both normed states
[n(h_fuse); n(h_K)] added to h_K (so it starts as the first head and can only learn to use the earlier layer).
Reported: top-1 agreement with the full model on the calib split's serving text and on all of it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn


class FusedInput(nn.Module):
    """h_K + W [n(h_fuse); n(h_K)], W zero at the start."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        from offramp.models.heads import RMSNorm

        self.norm_fuse, self.norm_k = RMSNorm(torch.ones(hidden), eps), RMSNorm(torch.ones(hidden), eps)
        self.proj = nn.Linear(2 * hidden, hidden, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, h_fuse: torch.Tensor, h_k: torch.Tensor) -> torch.Tensor:
        return h_k + self.proj(torch.cat([self.norm_fuse(h_fuse), self.norm_k(h_k)], -1))


@torch.no_grad()
def top1(features_of, data, mask, vocab_weight_full, chunk: int = 2048) -> float:
    idx = mask.nonzero()[:, 0]
    hits = 0
    for start in range(0, len(idx), chunk):
        sel = idx[start : start + chunk]
        hits += ((features_of(sel) @ vocab_weight_full.T).argmax(-1) == data.top1[sel]).sum().item()
    return hits / max(1, len(idx))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="offramp bench head-fusion", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--exit-layer", type=int, default=15)
    p.add_argument("--fuse", type=int, default=10, help="the earlier layer whose state is fused in")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--corpus-preset", choices=("default", "large"), default="large")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from tqdm.auto import tqdm

    from offramp.models.corpus import CORPUS_PRESETS
    from offramp.models.exit_heads import build_head
    from offramp.models.teacher import SERVING_SOURCES
    from offramp.models.train_exits import _lr_at, TrainConfig, feature_loss, prepare, training_vocab

    k, f = args.exit_layer, args.fuse
    prep = prepare(args.model, CORPUS_PRESETS[args.corpus_preset](), sorted({f, k}))
    model, data = prep.model, prep.data
    model.requires_grad_(False)
    torch.manual_seed(args.seed)
    plain = build_head("residual_mlp", model, {"width": 2048, "depth": 2})
    torch.manual_seed(args.seed)  # the same initial MLP in both heads
    fused_head = build_head("residual_mlp", model, {"width": 2048, "depth": 2})
    fusion = FusedInput(model.config.hidden_size, getattr(model.config, "rms_norm_eps", 1e-5))
    train_idx = data.mask("train").nonzero()[:, 0]
    vocab_weight = model.lm_head.weight[training_vocab(data, data.mask("train"))].detach()
    cfg = TrainConfig(exit_layer=k, steps=args.steps, lr=args.lr)
    opts = {
        "plain": torch.optim.AdamW([q for q in plain.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.01),
        "fused": torch.optim.AdamW([q for q in [*fused_head.parameters(), *fusion.parameters()] if q.requires_grad],
                                   lr=args.lr, weight_decay=0.01),
    }
    features = {
        "plain": lambda sel: plain.features(data.hidden[k][sel].float()),
        "fused": lambda sel: fused_head.features(fusion(data.hidden[f][sel].float(), data.hidden[k][sel].float())),
    }
    gen = torch.Generator().manual_seed(args.seed)
    for step in tqdm(range(args.steps), desc=f"plain vs fused {f}+{k}", unit="step"):
        sel = train_idx[torch.randint(len(train_idx), (args.batch_tokens,), generator=gen)]
        for name, opt in opts.items():
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss = feature_loss(features[name](sel), data.final[sel].float(), vocab_weight, 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    full_vocab = model.lm_head.weight.detach()
    result = {"exit_layer": k, "fuse": f, "steps": args.steps, "batch_tokens": args.batch_tokens,
              "train_positions": len(train_idx)}
    for name in opts:
        result[name] = {
            "calib_serving_top1": top1(features[name], data, data.mask("calib", SERVING_SOURCES), full_vocab),
            "calib_all_top1": top1(features[name], data, data.mask("calib"), full_vocab),
        }
        print(f"{name}: calib top-1 serving {result[name]['calib_serving_top1']:.3f}, all {result[name]['calib_all_top1']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
