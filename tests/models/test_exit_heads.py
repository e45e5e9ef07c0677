"""Trained exit heads: registry, save/load round trip, distillation lowers the loss."""

from __future__ import annotations

import json

import pytest
import torch

from offramp.models.exit_heads import HEAD_MANIFEST, build_head, load_head, save_head
from offramp.models.heads import HEAD_KINDS
from offramp.models.split import split_model
from offramp.models.teacher import teacher_data
from offramp.models.train_exits import TRAIN_STATE, TrainConfig, distill_loss, train_head, training_vocab
from offramp.shared.errors import ArtifactError, SplitConfigError
from tests.conftest import make_tiny_llama
from tests.models.exit_fixtures import perturbed, synthetic_sequences


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_saved_head_loads_back_with_identical_outputs(kind, tiny_model, tmp_path):
    head = perturbed(build_head(kind, tiny_model, {"exit_layer": 2} if kind == "mlp_stack" else {"width": 32}))
    save_head(head, tmp_path / "h", {"exit_layer": 2, "model_fingerprint": "x"})
    loaded, manifest = load_head(tmp_path / "h", tiny_model)
    x = torch.randn(2, 5, tiny_model.config.hidden_size)
    torch.testing.assert_close(loaded(x), head(x), rtol=0, atol=0)
    assert manifest["kind"] == kind and manifest["exit_layer"] == 2
    saved = json.loads((tmp_path / "h" / HEAD_MANIFEST).read_text())
    assert saved["config"] == head.config()
    from safetensors.torch import load_file

    assert not any(k.startswith("lm_head") for k in load_file(str(tmp_path / "h" / "head.safetensors")))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_plugs_into_edge_part(kind, tiny_model):
    head = build_head(kind, tiny_model, {"exit_layer": 2} if kind == "mlp_stack" else {})
    edge, _ = split_model(tiny_model, 2, head)
    out = edge(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
    assert out.exit_logits.shape == (1, 3, tiny_model.config.vocab_size)


def test_untrained_residual_head_equals_baseline(tiny_model):
    head = build_head("residual_mlp", tiny_model, {"width": 16})
    base = build_head("final_norm", tiny_model)
    x = torch.randn(3, tiny_model.config.hidden_size)
    torch.testing.assert_close(head(x), base(x), rtol=1e-5, atol=1e-5)


def test_bad_head_configs_name_the_value(tiny_model):
    with pytest.raises(SplitConfigError, match="lacks 'exit_layer'"):
        build_head("mlp_stack", tiny_model, {})
    with pytest.raises(SplitConfigError, match="depth 9"):
        build_head("mlp_stack", tiny_model, {"exit_layer": 2, "depth": 9})
    with pytest.raises(ArtifactError, match="nope"):
        build_head("nope", tiny_model)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_training_lowers_distillation_loss_and_resumes(kind, home):
    model = make_tiny_llama(num_layers=4)
    data = teacher_data(model, synthetic_sequences(), [2])
    calib = data.mask("calib")
    vocab_w = model.lm_head.weight[training_vocab(data, data.mask("train"))]
    head_config = {"width": 64, "depth": 1} if kind == "residual_mlp" else {"exit_layer": 2, "depth": 1}
    cfg = TrainConfig(exit_layer=2, kind=kind, head_config=head_config, steps=30, batch_tokens=128, lr=2e-3, warmup=3,
                      checkpoint_every=10)

    def calib_loss(head):
        with torch.no_grad():
            return distill_loss(head, data.hidden[2][calib].float(), data.final[calib].float(), vocab_w, 0.0).item()

    before = calib_loss(build_head(kind, model, cfg.head_config))
    head, stats = train_head(model, data, cfg, home / "out")
    assert calib_loss(head) < before
    assert stats["steps"] == 30 and (home / "out" / TRAIN_STATE).is_file()
    manifest = json.loads((home / "out" / HEAD_MANIFEST).read_text())
    assert manifest["exit_layer"] == 2 and len(manifest["model_fingerprint"]) == 64

    # Resuming a finished run changes nothing; a longer run continues from the checkpoint deterministically.
    again, _ = train_head(model, data, cfg, home / "out")
    x = data.hidden[2][:8].float()
    torch.testing.assert_close(again(x), head(x))
    with pytest.raises(ArtifactError, match="different training config"):
        train_head(model, data, TrainConfig(exit_layer=2, kind=kind, steps=31), home / "out")


def test_training_is_deterministic_with_a_seed(home):
    model = make_tiny_llama(num_layers=4)
    data = teacher_data(model, synthetic_sequences(), [2])
    cfg = TrainConfig(exit_layer=2, kind="residual_mlp", head_config={"width": 16}, steps=5, batch_tokens=64)
    a, _ = train_head(model, data, cfg, home / "a")
    b, _ = train_head(model, data, cfg, home / "b")
    x = data.hidden[2][:8].float()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
