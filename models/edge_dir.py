"""Exporting what the edge runs: edge graphs (`ensure_edge_graph`) and whole edge directories (`export_edge_dir`).

This is the model side of the edge: it needs torch and transformers. The edge itself only reads what this
writes (`offramp.shared.edge_dir`), so a device with an edge-only install runs `--edge DIR`. `--model SPEC`
on a full install comes here too: the model is exported once into the artifacts cache and the edge runs from
that directory, so there is one runtime path.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offramp.models.export import export_edge, export_multi_exit, head_identity
from offramp.shared.edge_dir import DEFAULT_EXPORT_PRECISIONS, TOKENIZER_DIR, EdgeDirManifest, early_exit_rule_dir, graph_dir_name
from offramp.shared.edge_manifest import PRECISIONS, check_manifest
from offramp.shared.errors import ArtifactError
from offramp.shared.exit_layers import check_exit_layers
from offramp.shared.exit_rule import ROUTER_FILE
from offramp.shared.version import __version__

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what `--model default` is served as
# What `offramp export` puts in an edge directory unless told: what `--edge-precision auto` picks between.


def model_name(spec: str) -> str:
    """The name a model is served under: the default's own name, else the checkpoint dir's or GGUF file's name."""
    if spec == "default":
        return DEFAULT_MODEL_NAME
    return Path(spec).name.removesuffix(".gguf") or str(spec)


def find_trained_head(model: Any, exit_layer: int) -> Path | None:
    """The head `offramp train-exits` left for this model and K, else the one offramp ships for them, if any."""
    from offramp.models.exit_heads import HEAD_MANIFEST
    from offramp.models.fingerprint import model_fingerprint
    from offramp.models.shipped import shipped_head_dir
    from offramp.models.train_exits import default_head_dir

    fingerprint = model_fingerprint(model)
    candidate = default_head_dir(fingerprint, exit_layer)
    return candidate if (candidate / HEAD_MANIFEST).is_file() else shipped_head_dir(fingerprint, exit_layer)


def pick_head(model: Any, exit_layer: int, head_dir: Path | str | None, use_trained: bool) -> Path | None:
    """An explicit head dir must hold a head; otherwise the trained one when present (unless told not to)."""
    from offramp.models.exit_heads import HEAD_MANIFEST

    if head_dir is not None:
        head_dir = Path(head_dir)
        if not (head_dir / HEAD_MANIFEST).is_file():
            raise ArtifactError(f"--head {str(head_dir)!r} holds no exit head ({HEAD_MANIFEST} missing); train one with `offramp train-exits`")
        return head_dir
    return find_trained_head(model, exit_layer) if use_trained else None


def pick_early_heads(model: Any, early_exits: Sequence[int], use_trained: bool) -> list[Path | None]:
    """Each early exit's head: the trained one for that layer when there is one (and wanted), else the final-norm head."""
    return [find_trained_head(model, k) if use_trained else None for k in early_exits]


def _exits_suffix(early_exits: Sequence[int]) -> str:
    """Cache names of a multi-exit edge carry its early exits (`-exits8` for `--exit-layers 8 15`)."""
    return f"-exits{'-'.join(map(str, early_exits))}" if early_exits else ""


def _identity(model: Any, head_dir: Path | None) -> tuple[Any, dict | None, dict]:
    from offramp.models.exit_heads import FinalNormHead, load_head

    if head_dir is None:
        return None, None, head_identity(FinalNormHead(model), None)
    head, head_manifest = load_head(Path(head_dir), model)
    return head, head_manifest, head_identity(head, head_manifest)


def ensure_edge_graph(
    model_spec: str,
    exit_layer: int,
    precision: str,
    out_dir: Path | str | None = None,
    head_dir: Path | str | None = None,
    model: Any = None,
    progress: bool = True,
    force: bool = False,
    early_exits: Sequence[int] = (),
    early_head_dirs: Sequence[Path | None] | None = None,
) -> Path:
    """The dir of an edge graph for (model, K, precision, head), exporting it when missing or not matching.

    Default place: `artifacts_dir(fingerprint, K)/edge-<precision>` (or `edge-<precision>-<head kind>` with a
    trained head). Pass `model` when it is already loaded, to skip loading it again. `early_exits` (exits before K,
    with `early_head_dirs`, None: final-norm heads) makes it a multi-exit graph dir (one graph per segment).
    """
    from offramp.models import load_model, model_fingerprint
    from offramp.models.architecture import check_exit_layer
    from offramp.shared.paths import artifacts_dir

    if precision not in PRECISIONS:
        raise ValueError(f"edge graph precision {precision!r} is not one of {PRECISIONS}")
    if model is None:
        model, _ = load_model(model_spec)
    check_exit_layer(model, exit_layer)
    layers = check_exit_layers([*early_exits, exit_layer], model.config.num_hidden_layers)
    fingerprint = model_fingerprint(model)
    head, head_manifest, identity = _identity(model, Path(head_dir) if head_dir is not None else None)
    early = [_identity(model, Path(d) if d is not None else None) for d in (early_head_dirs or [None] * len(early_exits))]
    if out_dir is None:
        suffix = "" if head is None else f"-{identity['kind']}"
        out_dir = artifacts_dir(fingerprint, exit_layer) / f"edge-{precision}{_exits_suffix(early_exits)}{suffix}"
    out_dir = Path(out_dir)
    if not force:
        try:
            manifest = check_manifest(out_dir, fingerprint=fingerprint, exit_layer=exit_layer, precision=precision, head=identity)
            heads = [seg["head"] for seg in manifest.get("segments", [])[:-1]]
            if manifest.get("exit_layers", [exit_layer]) == list(layers) and heads == [e[2] for e in early]:
                return out_dir
        except ArtifactError:
            pass  # missing, stale or for another model/head: export afresh
    if early_exits:
        heads_and_manifests = [(h, m) for h, m, _ in early] + [(head, head_manifest)]
        return export_multi_exit(model, layers, out_dir, precision, heads_and_manifests, progress=progress)
    return export_edge(model, exit_layer, out_dir, precision, head=head, head_manifest=head_manifest, progress=progress)


def export_edge_dir(
    model: Any,
    tokenizer: Any,
    model_spec: str,
    exit_layer: int,
    out_dir: Path | str,
    precisions: tuple[str, ...] | list[str] = DEFAULT_EXPORT_PRECISIONS,
    head_dir: Path | str | None = None,
    progress: bool = True,
    force: bool = False,
    keep_other_graphs: bool = False,
    early_exits: Sequence[int] = (),
    early_head_dirs: Sequence[Path | None] | None = None,
) -> Path:
    """Write a self-contained edge directory (see offramp.shared.edge_dir) for layers 0..K-1 and the head.

    `early_exits` (exits before K, each with its head from `early_head_dirs`, None: the final-norm head) makes a
    multi-exit directory: segment graphs, and each early head's calibrated rule in `exit-k<k>/router.json`.

    Graphs already there for the same model, K and head are kept (and re-exported only with `force`);
    `keep_other_graphs` also lists valid graphs of precisions not asked for (the cache grows one precision at a
    time). `head_dir=None` is the untrained final-norm head. The calibrated rule beside the head is copied.
    """
    from offramp.models import model_fingerprint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model)
    _, _, identity = _identity(model, Path(head_dir) if head_dir is not None else None)
    early_head_dirs = list(early_head_dirs) if early_head_dirs is not None else [None] * len(early_exits)
    layers = [*early_exits, exit_layer]
    graphs: dict[str, str] = {}
    for precision in PRECISIONS:
        rel = graph_dir_name(precision)
        if precision in precisions:
            ensure_edge_graph(model_spec, exit_layer, precision, out_dir / rel, head_dir, model, progress, force, early_exits, early_head_dirs)
            graphs[precision] = rel
        elif keep_other_graphs:
            try:
                graph = check_manifest(out_dir / rel, fingerprint=fingerprint, exit_layer=exit_layer, precision=precision, head=identity)
                if graph.get("exit_layers", [exit_layer]) == layers:
                    graphs[precision] = rel
            except ArtifactError:
                pass
    early_entries = []
    for k, early_dir in zip(early_exits, early_head_dirs):
        rule_dir = out_dir / early_exit_rule_dir(k)
        shutil.rmtree(rule_dir, ignore_errors=True)  # a stale calibration of another head must not steer this one
        source = None if early_dir is None else Path(early_dir) / ROUTER_FILE
        if source is not None and source.is_file():
            rule_dir.mkdir()
            shutil.copyfile(source, rule_dir / ROUTER_FILE)
        early_entries.append({
            "exit_layer": k, "head": _identity(model, None if early_dir is None else Path(early_dir))[2],
            "exit_rule": f"{early_exit_rule_dir(k)}/{ROUTER_FILE}" if (rule_dir / ROUTER_FILE).is_file() else None,
            "head_source": None if early_dir is None else str(early_dir),
        })
    rule_path = out_dir / ROUTER_FILE
    if head_dir is not None and (Path(head_dir) / ROUTER_FILE).is_file():
        shutil.copyfile(Path(head_dir) / ROUTER_FILE, rule_path)
    elif rule_path.exists():
        rule_path.unlink()  # a stale calibration of another head must not steer this one
    tok_dir = out_dir / TOKENIZER_DIR
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tokenizer.save_pretrained(str(tok_dir))
    files = {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(tok_dir.rglob("*")) if p.is_file()}
    if rule_path.is_file():
        files[ROUTER_FILE] = rule_path.stat().st_size
    for entry in early_entries:
        if entry["exit_rule"] is not None:
            files[entry["exit_rule"]] = (out_dir / entry["exit_rule"]).stat().st_size
    config = model.config
    EdgeDirManifest(
        model_name=model_name(model_spec),
        model_spec=str(model_spec),
        model_fingerprint=fingerprint,
        exit_layer=exit_layer,
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        max_positions=int(config.max_position_embeddings),
        graphs=graphs,
        head=identity,
        exit_rule=ROUTER_FILE if rule_path.is_file() else None,
        head_source=str(head_dir) if head_dir is not None else None,
        files=files,
        offramp_version=__version__,
        early_exits=early_entries,
    ).write(out_dir)
    return out_dir


def ensure_edge_dir(
    model_spec: str,
    exit_layer: int,
    precisions: tuple[str, ...] | list[str],
    head_dir: Path | str | None = None,
    use_trained: bool = True,
    loaded: tuple[Any, Any] | None = None,
    progress: bool = True,
    early_exits: Sequence[int] = (),
) -> tuple[Path, Any]:
    """`--model SPEC`: the cached edge directory for this model, K and head (exporting what is missing), and the
    loaded model (so `--cloud local` in the same process reuses its weights).

    Place: `artifacts_dir(fingerprint, K)/edge` (`edge-<head kind>` with a trained head; `edge-exits8...` with
    early exits, each with the head train-exits left for its layer when there is one and `use_trained`).
    """
    from offramp.models import load_model, model_fingerprint
    from offramp.models.architecture import check_exit_layer
    from offramp.shared.paths import artifacts_dir

    model, tokenizer = loaded if loaded is not None else load_model(model_spec)
    check_exit_layer(model, exit_layer)
    check_exit_layers([*early_exits, exit_layer], model.config.num_hidden_layers)
    head = pick_head(model, exit_layer, head_dir, use_trained)
    early_heads = pick_early_heads(model, early_exits, use_trained)
    _, _, identity = _identity(model, head)
    name = "edge" + _exits_suffix(early_exits) + ("" if head is None else f"-{identity['kind']}")
    out = artifacts_dir(model_fingerprint(model), exit_layer) / name
    try:
        manifest = EdgeDirManifest.read(out)
        fresh = manifest.head == identity and set(precisions) <= set(manifest.graphs) and _same_rule(out, head)
        fresh = fresh and manifest.exit_layers == (*early_exits, exit_layer)
        for entry, early_dir in zip(manifest.early_exits, early_heads):
            rule_dir = out / early_exit_rule_dir(int(entry["exit_layer"]))
            fresh = fresh and entry["head"] == _identity(model, early_dir)[2] and _same_rule(rule_dir, early_dir)
    except ArtifactError:
        fresh = False
    if not fresh:
        export_edge_dir(model, tokenizer, model_spec, exit_layer, out, precisions, head, progress, keep_other_graphs=True,
                        early_exits=early_exits, early_head_dirs=early_heads)
    return out, model


def _same_rule(edge_dir: Path, head_dir: Path | None) -> bool:
    """The cached directory's rule is the head's current one (a re-calibration must reach the edge)."""
    cached, source = edge_dir / ROUTER_FILE, None if head_dir is None else Path(head_dir) / ROUTER_FILE
    if source is None or not source.is_file():
        return not cached.exists()
    return cached.is_file() and cached.read_bytes() == source.read_bytes()


