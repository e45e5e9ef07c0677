"""`offramp export` (and, later, train-exits / calibrate / eval): one `add_<name>` + `run_<name>` pair per subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offramp.shared.cli import add_exit_layers_flag
from offramp.shared.edge_dir import DEFAULT_EXPORT_PRECISIONS
from offramp.shared.edge_manifest import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the root `offramp` parser."""
    add_export(subparsers)
    add_train_exits(subparsers)
    add_calibrate(subparsers)
    add_eval(subparsers)
    add_ship_heads(subparsers)


def add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a self-contained edge directory: ONNX graph(s), head, exit rule, tokenizer")
    p.add_argument("--model", default="default", help="'default', a local HF checkpoint dir, or a .gguf file")
    add_exit_layers_flag(p, required=True, help="K: the edge runs layers 0..K-1; several (`--exit-layers 8 15`, increasing): early "
                         "exits inside the edge, each with the trained head of its layer when there is one, the last is K")
    p.add_argument("--out", type=Path, default=None, help="the edge directory (default: the artifacts cache for this model and K)")
    p.add_argument("--precision", choices=PRECISIONS, nargs="+", default=list(DEFAULT_EXPORT_PRECISIONS),
                   help="edge graphs to include (default: q4, int8 and fp32; `--edge-precision auto` picks int8 standalone, q4 collaborating)")
    p.add_argument("--head", type=Path, default=None, help="dir of a trained exit head (default: the one train-exits wrote, if any)")
    p.add_argument("--no-trained-head", action="store_true", help="export the untrained final-norm head even when a trained one exists")
    p.add_argument("--force", action="store_true", help="export the graphs again even when matching ones are already there")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from offramp.models import load_model
    from offramp.models.edge_dir import ensure_edge_dir, export_edge_dir, pick_early_heads, pick_head
    from offramp.shared.exit_layers import check_exit_layers
    from offramp.shared.edge_dir import EdgeDirManifest

    loaded = load_model(args.model)
    *early, exit_layer = check_exit_layers(args.exit_layers, loaded[0].config.num_hidden_layers)
    if args.out is None:
        out, _ = ensure_edge_dir(args.model, exit_layer, args.precision, args.head, not args.no_trained_head, loaded, early_exits=early)
    else:
        model, tokenizer = loaded
        head = pick_head(model, exit_layer, args.head, not args.no_trained_head)
        out = export_edge_dir(model, tokenizer, args.model, exit_layer, args.out, args.precision, head, force=args.force,
                              early_exits=early, early_head_dirs=pick_early_heads(model, early, not args.no_trained_head))
    manifest = EdgeDirManifest.read(out)
    graphs = ", ".join(f"{precision} {sum(f.stat().st_size for f in (out / rel).iterdir()) / 1e6:.1f} MB" for precision, rel in manifest.graphs.items())
    rule = "calibrated rule" if manifest.exit_rule else "max-prob rule"
    exits = f"exits {'/'.join(map(str, manifest.exit_layers))}, " if manifest.early_exits else ""
    print(f"{out}  ({exits}K={manifest.exit_layer}, {manifest.model_name}: {graphs}; head {manifest.head.get('kind')}, {rule}; "
          f"run it with `offramp edge serve --edge {out} --cloud URL`)")
    return 0


# --- exit heads: train-exits, calibrate, eval (models/train_exits.py, router.py, evaluate.py) ------------------


def _add_exit_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', a local HF checkpoint dir, or a .gguf file")
    p.add_argument("--exit-layer", type=int, nargs="+", required=True, help="K (several share one teacher pass)")
    p.add_argument("--corpus", nargs="+", default=None, metavar="FILE", help="plain-text files added to the corpus")
    p.add_argument("--corpus-preset", choices=("default", "quick", "large"), default=None,
                   help="default: 256 built-in prompts + human text (minutes); large: 3,072 catalog prompts, greedy + "
                        "sampled, ~0.8M positions (~30 min on 2 cores, resumable; the shipped heads' corpus); "
                        "quick: for development (default: the corpus the head was trained on, else default)")
    p.add_argument("--selfgen-prompts", type=int, default=None, metavar="N",
                   help="with --corpus-preset large: continue the catalog's first N prompts (2,048 by default, up to "
                        "9,348: ~35x the default corpus's training positions)")
    p.add_argument("--quick", action="store_true", help="--corpus-preset quick and few steps, for development")


def _corpus_spec(args: argparse.Namespace, head_dir: Path | None = None):
    """--quick/--corpus-preset/--corpus if given, else the corpus the head was trained on, else the default corpus."""
    from dataclasses import replace

    from offramp.models.corpus import CORPUS_PRESETS, CorpusSpec
    from offramp.models.train_exits import corpus_spec_from_manifest
    from offramp.shared.errors import SplitConfigError

    preset = "quick" if args.quick else args.corpus_preset
    prompts = args.selfgen_prompts
    if prompts is not None and preset != "large":
        raise SplitConfigError(f"--selfgen-prompts {prompts} needs --corpus-preset large (the catalog's corpus)")
    if preset or args.corpus:
        spec = CORPUS_PRESETS[preset or "default"]()
        spec.files = tuple(str(Path(f).resolve()) for f in args.corpus or ())
        if prompts is not None:
            spec = replace(spec, selfgen_prompts=prompts)  # validated by CorpusSpec
        return spec
    return (corpus_spec_from_manifest(head_dir) if head_dir else None) or CorpusSpec()


def _head_dirs(args: argparse.Namespace, fingerprint: str, flag: str) -> dict[int, Path]:
    from offramp.models.train_exits import default_head_dir
    from offramp.shared.errors import SplitConfigError

    given = getattr(args, flag)
    if given is not None and len(args.exit_layer) > 1:
        raise SplitConfigError(f"--{flag} {given} names one directory but {len(args.exit_layer)} exit layers were given")
    return {k: Path(given) if given is not None else default_head_dir(fingerprint, k) for k in args.exit_layer}


def add_train_exits(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-exits", help="distil an exit head at layer K from the full model (base frozen)")
    _add_exit_common(p)
    p.add_argument("--out", type=Path, default=None, help="head dir (default: artifacts cache for this model and K)")
    p.add_argument("--kind", default="residual_mlp",
                   help="head kind: residual_mlp (default), mlp_stack, or decoder_layer (one attention + FFN layer with its own KV)")
    p.add_argument("--depth", type=int, default=None, help="blocks in the head (default per kind)")
    p.add_argument("--head-config", type=json.loads, default=None, metavar="JSON",
                   help='keys over the kind\'s default config, e.g. \'{"init_layer": 15, "zero_output": true}\' for decoder_layer '
                        '(default: a copy of the last layer, init_layer -1)')
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000, --quick 40)")
    p.add_argument("--batch-tokens", type=int, default=None, help="positions per step (default 1024, --quick 256)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the feature cosine loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=18.0, help="minutes per K; stops early and saves (0: none)")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out instead of resuming it")
    p.set_defaults(func=run_train_exits)


def run_train_exits(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from offramp.models.corpus import corpus_key
    from offramp.models.heads import CONTEXT_HEAD_KINDS, default_head_config
    from offramp.models.train_exits import TRAIN_STATE, TrainConfig, prepare, train_head

    spec = _corpus_spec(args)
    prep = prepare(args.model, spec, args.exit_layer, context=args.kind in CONTEXT_HEAD_KINDS)
    dirs = {k: (args.out / f"k{k}" if args.out and len(args.exit_layer) > 1 else args.out) for k in args.exit_layer}
    for k in args.exit_layer:
        out = dirs[k] or _head_dirs(args, prep.fingerprint, "out")[k]
        head_config = default_head_config(args.kind, k)
        if args.depth is not None:
            head_config["depth"] = args.depth
        head_config.update(args.head_config or {})
        cfg = TrainConfig(
            exit_layer=k, kind=args.kind, head_config=head_config, seed=args.seed, lr=args.lr,
            steps=args.steps or (40 if args.quick else 2000),
            batch_tokens=args.batch_tokens or (256 if args.quick else 1024),
            hidden_weight=args.hidden_weight,
        )
        if args.fresh and (out / TRAIN_STATE).is_file():
            (out / TRAIN_STATE).unlink()
        meta = {"corpus_spec": asdict(spec), "corpus_key": corpus_key(prep.sequences)}
        _, stats = train_head(
            prep.model, prep.data, cfg, out, time_budget_s=args.time_budget * 60 or None, extra_meta=meta
        )
        print(f"K={k}: {out}  calib top-1 agreement {stats['calib_agreement']:.3f} after {stats['steps']} steps "
              f"({stats['train_seconds']:.0f} s)")
    return 0


def add_calibrate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="fit the exit rule and pick the threshold meeting a target agreement")
    _add_exit_common(p)
    p.add_argument("--head", type=Path, default=None, help="head dir (default: artifacts cache for this model and K)")
    p.add_argument("--target-agreement", type=float, required=True, help="e.g. 0.99: collaborative top-1 agreement")
    p.add_argument("--router", choices=("logistic", "max_prob"), default="logistic")
    p.add_argument("--on", choices=("serving", "human", "all"), default="serving", help="calib-split text to fit on")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from offramp.models import load_model, model_fingerprint
    from offramp.models.evaluate import calibrate_head
    from offramp.models.exit_heads import head_kv_layers, load_head
    from offramp.shared.exit_rule import save_exit_rule
    from offramp.models.teacher import HUMAN_SOURCES, SERVING_SOURCES, SOURCES
    from offramp.models.train_exits import prepare

    model, _ = load_model(args.model)
    dirs = _head_dirs(args, model_fingerprint(model), "head")
    prep = prepare(args.model, _corpus_spec(args, dirs[args.exit_layer[0]]), args.exit_layer)
    sources = {"serving": SERVING_SOURCES, "human": HUMAN_SOURCES, "all": SOURCES}[args.on]
    for k, head_dir in dirs.items():
        head, _ = load_head(head_dir, prep.model)
        if head_kv_layers(head):
            prep.add_context([k])
        rule = calibrate_head(prep.data, head, k, args.target_agreement, args.router, sources)
        path = save_exit_rule(rule, head_dir)
        m = rule.meta
        print(f"K={k}: threshold {rule.threshold:.4f} -> calib exit rate {m['calib_exit_rate']:.3f} at agreement "
              f"{m['calib_agreement']:.4f}, one-sided {m['confidence_level']:.0%} lower bound "
              f"{m['calib_agreement_lower_bound']:.4f} ({m['calib_positions']} positions); wrote {path}")
    return 0


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="exit rate vs agreement on held-out text, teacher-forced and free-running")
    _add_exit_common(p)
    p.add_argument("--head", type=Path, default=None, help="head dir (default: artifacts cache; 'none': baseline)")
    p.add_argument("--json", action="store_true", help="print one JSON object per exit layer")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="Pareto plot, one curve per K")
    p.add_argument("--free-prompts", type=int, default=24, help="held-out prompts for free-running greedy (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from offramp.models import load_model, model_fingerprint
    from offramp.models.evaluate import evaluate_layer, pareto_plot
    from offramp.models.exit_heads import FinalNormHead, head_kv_layers, load_head
    from offramp.shared.exit_rule import load_exit_rule
    from offramp.models.train_exits import prepare

    model, _ = load_model(args.model)
    baseline = args.head is not None and str(args.head) == "none"
    if baseline:
        args.head = None
    dirs = _head_dirs(args, model_fingerprint(model), "head")
    prep = prepare(args.model, _corpus_spec(args, None if baseline else dirs[args.exit_layer[0]]), args.exit_layer)
    curves = {}
    for k, head_dir in dirs.items():
        head = FinalNormHead(prep.model) if baseline else load_head(head_dir, prep.model)[0]
        if head_kv_layers(head):
            prep.add_context([k])
        rule = load_exit_rule(None if baseline else head_dir)
        res = evaluate_layer(prep.model, prep.tokenizer, prep.sequences, prep.data, head, rule, k,
                             args.free_prompts if args.free_prompts > 0 else 0, args.max_new_tokens)
        curves[f"K={k}" + (" baseline" if baseline else "")] = res["points"]
        if args.json:
            print(json.dumps(res))
        else:
            _print_eval(res)
    if args.plot:
        path = pareto_plot(curves, args.plot, "held-out serving text (teacher-forced)")
        print(f"plot: {path}", file=sys.stderr if args.json else sys.stdout)  # --json keeps stdout pure JSON
    return 0


def _print_eval(res: dict) -> None:
    print(f"K={res['exit_layer']}  rule={res['rule']}  calibrated threshold={res['calibrated_threshold']:.4f}")
    for name in ("serving", "human"):
        if name not in res:
            continue
        sw = res[name]
        c = sw["at_calibrated"]
        print(f"  {name}: {sw['positions']} positions; edge-only top-1 {sw['edge_top1_agreement']:.3f}; "
              f"ppl full {sw['full_ppl']:.2f} edge {sw['edge_ppl']:.2f}")
        print(f"    at calibrated threshold: exit rate {c['exit_rate']:.3f}, agreement {c['agreement']:.4f}, "
              f"ppl {c['ppl']:.2f}")
        for i, o in enumerate(sw["oracle_on_test"]):
            mp = sw.get("oracle_on_test_max_prob")
            extra = f" (max-prob rule: {mp[i]['exit_rate']:.3f})" if mp else ""
            print(f"    best exit rate at agreement >= {o['target']} (threshold set on test): {o['exit_rate']:.3f}{extra}; "
                  f"certified (one-sided {o['level']:.0%} lower bound >= {o['target']}): {o['certified_exit_rate']:.3f}, "
                  f"bound {o['agreement_lower_bound']:.4f}")
        for d in sw.get("lossless", []):
            print(f"    lossless, {d['drafts']} drafts a round trip: {d['tokens_per_round_trip']:.2f} tokens per round trip, "
                  f"acceptance {d['acceptance_rate']:.3f}")
    for name, fr in res.get("free_running", {}).items():
        print(f"  free-running {name} ({fr['prompts']} prompts): common prefix {fr['common_prefix_fraction']:.3f}, "
              f"exact {fr['exact_match_fraction']:.3f}, edge fraction {fr['edge_fraction']:.3f}")


def add_ship_heads(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ship-heads", help="copy trained, calibrated heads into the package (models/shipped_heads) with their figures")
    p.add_argument("--model", default="default", help="'default', a local HF checkpoint dir, or a .gguf file")
    p.add_argument("--exit-layer", type=int, nargs="+", required=True, help="K (each needs `train-exits` and `calibrate` first)")
    p.add_argument("--head", type=Path, default=None, help="head dir (default: the artifacts cache for this model and K)")
    p.set_defaults(func=run_ship_heads)


def run_ship_heads(args: argparse.Namespace) -> int:
    from offramp.models import load_model, model_fingerprint
    from offramp.models.shipped import ship_head

    model, tokenizer = load_model(args.model)
    for k, head_dir in _head_dirs(args, model_fingerprint(model), "head").items():
        out = ship_head(model, tokenizer, head_dir, k)
        figures = json.loads((out / "eval.json").read_text())
        lossless = {d["drafts"]: round(d["tokens_per_round_trip"], 2) for d in figures["lossless"]}
        print(f"K={k}: shipped {out} ({figures['positions']} held-out positions: top-1 {figures['top1_agreement']:.3f}, "
              f"lossless tokens per round trip by drafts {lossless}, at its threshold {figures['at_threshold']})")
    return 0
