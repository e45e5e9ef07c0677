"""Which router signals raise the certified exit rate: a measurement over held-out serving text (issue 12 item 3).

    .venv/bin/offramp bench router-signals [--model default] [--exit-layer 15] [--earlier 10]
        [--head DIR] [--earlier-head DIR] [--corpus-preset large] [--json FILE]

Beside the exit rule's logit features (max-prob, its log-odds, entropy, top-2 margins, max logit) it tries what the
edge could add at no graph cost or little: a copy-from-context flag (the head's token already occurs in the text,
anywhere / in the last 32 tokens), the previous position's confidence and the change from it, and agreement with
an earlier exit's head (its argmax equals K's, and its max-prob; costs a second LM head on the edge). For each set
a logistic router is fitted on the calib split, its certified threshold picked there (one-sided 95% Clopper-Pearson
lower bound >= target), and the exit rate and agreement at that threshold measured on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RECENT = 32  # tokens back that count as "recent" for the copy flag


def head_outputs(head, data, exit_layer: int, idx) -> tuple[np.ndarray, np.ndarray]:
    """(logit features [N, F], argmax [N]) of a head over the positions `idx`."""
    from offramp.models.attention_head import exit_logits
    from offramp.shared.exit_rule import logit_features

    feats, arg = [], []
    for _, logits in exit_logits(head, data, exit_layer, idx, 512):
        logits = logits.float()
        feats.append(logit_features(logits.numpy()))
        arg.append(logits.argmax(-1).numpy())
    return np.concatenate(feats), np.concatenate(arg)


def context_signals(seqs, data, idx: np.ndarray, tokens: np.ndarray, max_prob: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: whether the head's token occurs in the context (anywhere, recently), the previous position's
    max-prob and the change from it."""
    seq_of = data.seq.numpy()
    first_row = {int(s): int(r) for r, s in reversed(list(enumerate(seq_of)))}  # each sequence's first scored row
    in_context, in_recent, previous = (np.zeros(len(idx)) for _ in range(3))
    for r, row in enumerate(idx):
        s = int(seq_of[row])
        seq = seqs[s]
        position = max(seq.score_from - 1, 0) + int(row) - first_row[s]
        context = seq.input_ids[: position + 1]
        in_context[r] = tokens[r] in context
        in_recent[r] = tokens[r] in context[-RECENT:]
        previous[r] = max_prob[r - 1] if r > 0 and idx[r - 1] == row - 1 and seq_of[row - 1] == s else 1.0
    return {"in_context": in_context, "in_recent": in_recent, "previous_max_prob": previous,
            "max_prob_change": max_prob - previous}


def signal_sets(seqs, data, heads: dict[int, object], k: int, earlier: int, mask) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Feature matrices per candidate set over the masked positions, and whether K's head agrees there."""
    idx = mask.nonzero()[:, 0]
    base, tokens = head_outputs(heads[k], data, k, idx)
    early, early_tokens = head_outputs(heads[earlier], data, earlier, idx)
    ctx = context_signals(seqs, data, idx.numpy(), tokens, base[:, 0])
    lens = np.c_[(early_tokens == tokens).astype(float), early[:, 0]]
    copy = np.c_[ctx["in_context"], ctx["in_recent"]]
    prev = np.c_[ctx["previous_max_prob"], ctx["max_prob_change"]]
    sets = {
        "logit features (the rule today)": base,
        "+ copy-from-context flags": np.c_[base, copy],
        "+ previous confidence and its change": np.c_[base, prev],
        f"+ agreement with the K={earlier} head": np.c_[base, lens],
        "all of them": np.c_[base, copy, prev, lens],
    }
    return sets, tokens == data.top1[idx].numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="offramp bench router-signals", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--exit-layer", type=int, default=15)
    p.add_argument("--earlier", type=int, default=10, help="the earlier exit whose agreement is a candidate signal")
    p.add_argument("--head", type=Path, default=None, help="K's head (default: the trained or shipped one)")
    p.add_argument("--earlier-head", type=Path, default=None)
    p.add_argument("--corpus-preset", choices=("default", "large"), default="large")
    p.add_argument("--targets", type=float, nargs="+", default=[0.99, 0.98, 0.95])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from offramp.models.corpus import CORPUS_PRESETS
    from offramp.models.edge_dir import find_trained_head
    from offramp.models.exit_heads import load_head
    from offramp.models.router import certified_threshold, fit_logistic_weights, logistic_confidence
    from offramp.models.teacher import SERVING_SOURCES
    from offramp.models.train_exits import prepare

    k, earlier = args.exit_layer, args.earlier
    prep = prepare(args.model, CORPUS_PRESETS[args.corpus_preset](), sorted({earlier, k}))
    heads = {}
    for layer, given in ((k, args.head), (earlier, args.earlier_head)):
        head_dir = given or find_trained_head(prep.model, layer)
        heads[layer] = load_head(head_dir, prep.model)[0].eval()
        print(f"K={layer}: head {head_dir}", file=sys.stderr)
    calib, calib_agree = signal_sets(prep.sequences, prep.data, heads, k, earlier, prep.data.mask("calib", SERVING_SOURCES))
    test, test_agree = signal_sets(prep.sequences, prep.data, heads, k, earlier, prep.data.mask("test", SERVING_SOURCES))
    print(f"serving positions: calib {len(calib_agree)}, test {len(test_agree)}; K={k} top-1 calib "
          f"{calib_agree.mean():.3f}, test {test_agree.mean():.3f}")
    rows = []
    for name in calib:
        fitted = fit_logistic_weights(calib[name], calib_agree)
        conf_calib, conf_test = logistic_confidence(calib[name], fitted), logistic_confidence(test[name], fitted)
        for target in args.targets:
            threshold, rate, _, bound = certified_threshold(conf_calib, calib_agree, target)
            exits = conf_test >= threshold
            row = {"signals": name, "target": target, "calib_certified_exit_rate": rate, "calib_lower_bound": bound,
                   "test_exit_rate": float(exits.mean()),
                   "test_agreement": float(1 - (exits & ~test_agree).sum() / len(test_agree))}
            rows.append(row)
            print(f"{name:40s} {target:.2f}: certified exit rate {rate:.3f} (calib), test {row['test_exit_rate']:.3f} "
                  f"at agreement {row['test_agreement']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"exit_layer": k, "earlier": earlier, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
