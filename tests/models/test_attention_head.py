"""The decoder_layer exit head: sequence context, training on whole sequences, and the exported ONNX graph equal to
the PyTorch head step by step (prefill, decode steps, truncate/rollback), with the layer-K states untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from offramp.edge.onnx_runtime import OnnxEdgeRuntime
from offramp.models.attention_head import DecoderLayerHead, exit_logits
from offramp.models.exit_heads import HEAD_MANIFEST, build_head, load_head, save_head
from offramp.models.export import export_edge
from offramp.models.reference_runtime import TorchEdgeRuntime
from offramp.models.split import EdgePart
from offramp.models.teacher import add_context, teacher_data
from offramp.models.train_exits import TRAIN_STATE, TrainConfig, agreement, train_head
from offramp.shared.edge_manifest import GRAPH_FILE, MANIFEST_FILE
from offramp.shared.errors import SplitConfigError
from tests.conftest import make_tiny_llama
from tests.models.exit_fixtures import perturbed, synthetic_sequences

K = 2


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))
    return tmp_path


def test_context_holds_every_position_and_maps_the_scored_rows(home):
    model = make_tiny_llama(num_layers=4)
    seqs = synthetic_sequences(n=12)
    data = add_context(model, seqs, teacher_data(model, seqs, [K]), [K])
    assert data.context[K].shape == (sum(len(s.input_ids) - 1 for s in seqs), model.config.hidden_size)
    # the scored rows' context states are the teacher's layer-K states (both fp16 of the same forward)
    torch.testing.assert_close(data.context[K][data.context_row].float(), data.hidden[K].float(), rtol=0, atol=2e-3)
    # the unscored prompt positions are there too, at the head of each chat sequence
    chat = next(i for i, s in enumerate(seqs) if s.score_from > 1)
    assert data.context_span[chat, 1] == len(seqs[chat].input_ids) - 1
    assert data.context_row[data.seq == chat][0] == data.context_span[chat, 0] + seqs[chat].score_from - 1
    again = add_context(model, seqs, teacher_data(model, seqs, [K]), [K])  # read back from the cache
    torch.testing.assert_close(again.context[K], data.context[K], rtol=0, atol=0)


def test_zero_output_head_starts_as_the_baseline_and_configs_are_checked(tiny_model):
    head = build_head("decoder_layer", tiny_model, {"init_layer": K, "zero_output": True})
    base = build_head("final_norm", tiny_model)
    x = torch.randn(2, 5, tiny_model.config.hidden_size)
    torch.testing.assert_close(head(x), base(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(SplitConfigError, match="init_layer 9"):
        build_head("decoder_layer", tiny_model, {"init_layer": 9})
    with pytest.raises(SplitConfigError, match="unknown keys"):
        build_head("decoder_layer", tiny_model, {"depth": 2})
    with pytest.raises(SplitConfigError, match="sequences"):
        head(torch.randn(3, tiny_model.config.hidden_size))


@pytest.mark.parametrize("config", [{"init_layer": K}, {"init_layer": -1}, {"init_layer": None, "zero_output": True}])
def test_saved_head_loads_back_with_identical_outputs(config, tiny_model, tmp_path):
    head = perturbed(build_head("decoder_layer", tiny_model, config))
    save_head(head, tmp_path / "h", {"exit_layer": K, "model_fingerprint": "x"})
    loaded, manifest = load_head(tmp_path / "h", tiny_model)
    x = torch.randn(2, 5, tiny_model.config.hidden_size)
    torch.testing.assert_close(loaded(x), head(x), rtol=0, atol=0)
    assert manifest["kind"] == "decoder_layer" and json.loads((tmp_path / "h" / HEAD_MANIFEST).read_text())["config"] == head.config()


def test_exit_logits_run_each_row_in_its_sequence(home):
    model = make_tiny_llama(num_layers=4)
    seqs = synthetic_sequences(n=12)
    data = add_context(model, seqs, teacher_data(model, seqs, [K]), [K])
    head = perturbed(build_head("decoder_layer", model, {"init_layer": K}))
    idx = torch.arange(len(data.top1))[::3]  # rows of many sequences, not all of each
    got = torch.cat([logits for _, logits in exit_logits(head, data, K, idx, chunk=40)])
    for r in idx[:: 7].tolist():  # each row: the head over its sequence's prefix, from position 0
        s = int(data.seq[r])
        start, row = int(data.context_span[s, 0]), int(data.context_row[r])
        want = head(data.context[K][start : row + 1].float()[None])[0, -1]
        torch.testing.assert_close(got[(idx == r).nonzero()[0, 0]], want, rtol=1e-4, atol=1e-4)


def test_training_on_sequences_raises_agreement_and_resumes(home):
    model = make_tiny_llama(num_layers=4)
    seqs = synthetic_sequences()
    data = teacher_data(model, seqs, [K])
    cfg = TrainConfig(exit_layer=K, kind="decoder_layer", steps=30, batch_tokens=96, lr=3e-3, warmup=3, checkpoint_every=10)
    assert cfg.head_config == {"init_layer": -1, "zero_output": False}  # the last layer's copy: measured best
    with pytest.raises(SplitConfigError, match="sequence context"):
        train_head(model, data, cfg, home / "nocontext")
    add_context(model, seqs, data, [K])
    calib = data.mask("calib").nonzero()[:, 0]

    def calib_kl(head) -> float:  # KL(full model || head) on held-out sequences, each row in its context
        kl = 0.0
        for sel, logits in exit_logits(head, data, K, calib, chunk=64):
            teacher = torch.log_softmax(model.lm_head(data.final[sel].float()), -1)
            kl += torch.nn.functional.kl_div(torch.log_softmax(logits, -1), teacher, log_target=True, reduction="sum").item()
        return kl / len(calib)

    before = calib_kl(build_head("decoder_layer", model, cfg.head_config))
    head, stats = train_head(model, data, cfg, home / "out")
    assert calib_kl(head) < before and stats["loss_last"] < stats["loss_first"]
    assert stats["calib_agreement"] == agreement(head, data, data.mask("calib"), K)
    assert (home / "out" / TRAIN_STATE).is_file()
    again, _ = train_head(model, data, cfg, home / "out")  # resuming a finished run changes nothing
    x = data.context[K][:20].float()[None]
    torch.testing.assert_close(again(x), head(x), rtol=0, atol=0)


def test_exported_graph_equals_the_torch_head_through_prefill_steps_and_rollback(tiny_model, tmp_path):
    head = perturbed(DecoderLayerHead(tiny_model, init_layer=K))
    graph = export_edge(tiny_model, K, tmp_path / "g", "fp32", head=head, progress=False)
    manifest = json.loads((graph / MANIFEST_FILE).read_text())
    assert manifest["head_kv_layers"] == 1 and manifest["head"]["kind"] == "decoder_layer"
    assert [i["name"] for i in manifest["inputs"]][-2:] == ["past_key_head0", "past_value_head0"]
    onnx_rt, torch_rt = OnnxEdgeRuntime(graph), TorchEdgeRuntime(EdgePart(tiny_model, K, head))
    plain_rt = TorchEdgeRuntime(EdgePart(tiny_model, K))  # the untrained head: layer-K states must not change

    def step(ids: list[int]) -> None:
        a, b, c = onnx_rt.run(ids), torch_rt.run(ids), plain_rt.run(ids)
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.hidden, b.hidden, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(b.hidden, c.hidden)
        assert onnx_rt.length == torch_rt.length == plain_rt.length

    step([5, 9, 17, 33, 2])  # prefill
    for t in (7, 8, 40):
        step([t])
    for rt in (onnx_rt, torch_rt, plain_rt):  # the decode loop's rollback of rejected drafts
        rt.truncate(6)
    step([11])
    step([12, 13, 14])  # a verified chunk after the rollback
    # after the rollback the cached step equals the head run from scratch over the kept sequence
    ids = [5, 9, 17, 33, 2, 7, 11, 12, 13, 14, 15]
    with torch.no_grad():
        scratch = head(EdgePart(tiny_model, K)(torch.tensor([ids]), torch.arange(len(ids))[None]).hidden)[0, -1]
    np.testing.assert_allclose(onnx_rt.run([15]).logits, scratch.numpy(), rtol=1e-4, atol=1e-4)


def test_quantized_graph_with_the_head_runs(tiny_model, tmp_path):
    head = perturbed(DecoderLayerHead(tiny_model, init_layer=K))
    graph = export_edge(tiny_model, K, tmp_path / "q", "int8", head=head, progress=False)
    rt = OnnxEdgeRuntime(graph)
    rt.run([1, 2, 3])
    step = rt.run([4])
    assert step.logits.shape == (tiny_model.config.vocab_size,) and np.isfinite(step.logits).all()
    assert (graph / GRAPH_FILE).is_file()
