"""Shipped exit heads: how one is made (fp16 copy, rule, figures on held-out texts), found, and that each head the
package carries still measures what its eval.json recorded."""

from __future__ import annotations

import json

import pytest
import torch

from offramp.models.exit_heads import HEAD_MANIFEST, HEAD_WEIGHTS, build_head, load_head, save_head
from offramp.models.fingerprint import model_fingerprint
from offramp.models.shipped import (
    EVAL_FILE,
    EVAL_TEXTS,
    SHIPPED_ROOT,
    head_figures,
    sequences_from_json,
    ship_head,
    shipped_head_dir,
)
from offramp.shared.errors import ArtifactError
from offramp.shared.exit_rule import ROUTER_FILE, ExitRule, load_exit_rule, save_exit_rule


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))  # teacher caches land here, not in the real cache
    from offramp.models import load_model
    from offramp.models.tiny import save_tiny_checkpoint

    return load_model(str(save_tiny_checkpoint(tmp_path / "tiny", num_layers=4)))


def test_a_shipped_head_is_an_fp16_copy_with_its_rule_and_figures(tiny, tmp_path) -> None:
    model, tokenizer = tiny
    head = build_head("residual_mlp", model, {"width": 32, "depth": 1})
    torch.manual_seed(0)
    for p in head.blocks.parameters():
        torch.nn.init.normal_(p, std=0.1)  # not the zero-init start: a head with something to round
    trained = save_head(head, tmp_path / "trained", {"exit_layer": 2, "model_fingerprint": model_fingerprint(model)})
    with pytest.raises(ArtifactError, match="calibrate"):
        ship_head(model, tokenizer, trained, 2, root=tmp_path / "pkg")
    save_exit_rule(ExitRule(kind="max_prob", threshold=0.5), trained)

    out = ship_head(model, tokenizer, trained, 2, root=tmp_path / "pkg")
    assert shipped_head_dir(model_fingerprint(model), 2, root=tmp_path / "pkg") == out
    assert shipped_head_dir(model_fingerprint(model), 3, root=tmp_path / "pkg") is None
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / HEAD_WEIGHTS)).values()} == {torch.float16}
    assert load_exit_rule(out).threshold == 0.5 and (out / HEAD_MANIFEST).is_file()
    # Loaded back it computes in fp32 and gives the trained head's logits to fp16 rounding.
    shipped, _ = load_head(out, model)
    x = torch.randn(5, model.config.hidden_size)
    assert shipped.blocks[0].gate.weight.dtype == torch.float32
    torch.testing.assert_close(shipped(x), head(x), atol=2e-2, rtol=2e-2)
    # Its figures were measured on held-out texts stored beside it, and measuring again gives them back.
    figures = json.loads((out / EVAL_FILE).read_text())
    texts = sequences_from_json(json.loads((out.parent / EVAL_TEXTS).read_text()))
    assert texts and all(s.split == "test" and s.score_from < len(s.input_ids) for s in texts)
    again = head_figures(model, shipped, 2, texts, load_exit_rule(out))
    assert figures["positions"] == again["positions"] > 0
    assert figures["top1_agreement"] == pytest.approx(again["top1_agreement"])
    assert [d["drafts"] for d in figures["lossless"]] == [2, 4, 8]
    assert 0.0 <= figures["at_threshold"]["exit_rate"] <= 1.0


def test_a_head_with_its_own_kv_ships_too(tiny, tmp_path) -> None:
    """A decoder-layer head attends over past positions: its figures need every position's state (the context)."""
    model, tokenizer = tiny
    head = build_head("decoder_layer", model)
    trained = save_head(head, tmp_path / "attn", {"exit_layer": 2, "model_fingerprint": model_fingerprint(model)})
    save_exit_rule(ExitRule(kind="max_prob", threshold=0.5), trained)
    out = ship_head(model, tokenizer, trained, 2, root=tmp_path / "pkg")
    figures = json.loads((out / EVAL_FILE).read_text())
    assert figures["positions"] > 0 and 0.0 <= figures["top1_agreement"] <= 1.0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".k")]  # no staging dir left behind


def test_a_head_for_another_model_is_refused(tiny, tmp_path) -> None:
    model, _ = tiny
    target = tmp_path / "pkg" / ("0" * 16) / "k2"
    target.mkdir(parents=True)
    (target / HEAD_MANIFEST).write_text(json.dumps({"kind": "residual_mlp", "model_fingerprint": "f" * 32}))
    with pytest.raises(ArtifactError, match="not"):
        shipped_head_dir("0" * 32, 2, root=tmp_path / "pkg")


SHIPPED = sorted(p for p in SHIPPED_ROOT.glob("*/k*") if (p / HEAD_MANIFEST).is_file()) if SHIPPED_ROOT.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("head_dir", SHIPPED, ids=[f"{p.parent.name}-{p.name}" for p in SHIPPED])
def test_each_shipped_head_still_measures_what_it_recorded(head_dir, default_model, tmp_path, monkeypatch) -> None:
    model, _ = default_model
    fingerprint = model_fingerprint(model)
    recorded = json.loads((head_dir / EVAL_FILE).read_text())
    k = recorded["exit_layer"]
    assert shipped_head_dir(fingerprint, k) == head_dir  # for this model: what a fresh install's export takes
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))  # no head in the cache: the shipped one is found
    from offramp.models.edge_dir import find_trained_head

    assert find_trained_head(model, k) == head_dir
    head, _ = load_head(head_dir, model)
    texts = sequences_from_json(json.loads((head_dir.parent / EVAL_TEXTS).read_text()))
    again = head_figures(model, head, k, texts, load_exit_rule(head_dir))
    assert again["positions"] == recorded["positions"]
    assert again["top1_agreement"] == pytest.approx(recorded["top1_agreement"], abs=0.01)
    for now, then in zip(again["lossless"], recorded["lossless"]):
        assert now["tokens_per_round_trip"] == pytest.approx(then["tokens_per_round_trip"], abs=0.05)
    assert again["at_threshold"]["exit_rate"] == pytest.approx(recorded["at_threshold"]["exit_rate"], abs=0.02)
    assert (head_dir / ROUTER_FILE).is_file()
