"""`offramp generate`, EdgeService and LocalEngine run the trained head + calibrated threshold; flags override; the
cloud's token is `--cloud-token-file`, else $OFFRAMP_CLOUD_TOKEN, else $OFFRAMP_TOKEN.

A tiny random checkpoint stands in for the default model; OFFRAMP_HOME is a tmp dir so the machine's real
artifacts are never read.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from offramp.edge import ws_link
from offramp.edge.config import EdgeConfig, ServiceConfigError
from offramp.edge.local import LocalEngine
from offramp.edge.service import EdgeService
from offramp.models import load_model
from offramp.models.exit_heads import build_head, save_head
from offramp.models.fingerprint import model_fingerprint
from offramp.models.train_exits import default_head_dir
from offramp.shared.cli import main
from offramp.shared.exit_rule import ExitRule, save_exit_rule
from tests.conftest import save_tiny_checkpoint

K = 2
CALIBRATED = 0.42


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny checkpoint (`--model DIR`) with a trained head + router.json at train-exits' default place."""
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))
    for env in ("OFFRAMP_TOKEN", "OFFRAMP_CLOUD_TOKEN"):
        monkeypatch.delenv(env, raising=False)
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", num_layers=4, seed=5)
    model, tokenizer = load_model(str(checkpoint))
    head_dir = default_head_dir(model_fingerprint(model), K)
    torch.manual_seed(0)
    save_head(build_head("residual_mlp", model, {"width": 16, "depth": 1}), head_dir,
              {"exit_layer": K, "model_fingerprint": model_fingerprint(model)})
    save_exit_rule(ExitRule("logistic", CALIBRATED, [1.0, 0, 0, 0, 0, 0], 0.0, [0.0] * 6, [1.0] * 6), head_dir)
    return str(checkpoint), (model, tokenizer), head_dir


def generate_json(capsys, model: str, *flags: str) -> dict:
    argv = ["generate", "--model", model, "--prompt", "t1 t2 t3", "--exit-layer", str(K), "--max-new-tokens", "4",
            "--cloud", "local", "--json", *flags]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_reports_the_trained_head_and_calibrated_threshold(tiny, capsys) -> None:
    spec, _, head_dir = tiny
    out = generate_json(capsys, spec)
    assert out["exit_rule"] == {"head": str(head_dir), "rule": "logistic", "threshold": CALIBRATED, "threshold_source": "calibrated"}
    assert out["threshold"] == CALIBRATED and len(out["token_ids"]) == 4 and out["edge_precision"] == "q4"  # auto, collaborating
    assert {"sources", "mode", "exit_layer", "stats", "text"} <= out.keys()


def test_generate_flags_override_the_calibration(tiny, capsys) -> None:
    spec, _, head_dir = tiny
    out = generate_json(capsys, spec, "--threshold", "2")
    assert out["exit_rule"]["threshold_source"] == "flag" and out["threshold"] == 2.0
    assert out["exit_rule"]["head"] == str(head_dir) and out["stats"]["edge_exits"] == 0  # 2 never exits
    plain = generate_json(capsys, spec, "--no-trained-head")
    assert plain["exit_rule"] == {"head": "final-norm (untrained)", "rule": "max_prob", "threshold": 0.9, "threshold_source": "default"}


def test_generate_runs_an_exported_edge_directory(tiny, tmp_path, capsys) -> None:
    """`offramp export --out DIR` then `generate --edge DIR`: the same tokens as `--model`, from the directory alone."""
    spec, _, head_dir = tiny
    out_dir = tmp_path / "edge"
    assert main(["export", "--model", spec, "--exit-layer", str(K), "--out", str(out_dir), "--precision", "fp32"]) == 0
    assert str(out_dir) in capsys.readouterr().out
    from_dir = generate_json(capsys, spec, "--edge", str(out_dir), "--exit-layer", str(K))
    from_model = generate_json(capsys, spec)
    assert from_dir["token_ids"] == from_model["token_ids"] and from_dir["exit_rule"] == from_model["exit_rule"]
    assert from_dir["edge_dir"] == str(out_dir)
    assert main(["generate", "--edge", str(out_dir), "--exit-layer", "3", "--prompt", "t1", "--cloud", "none"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["generate", "--edge", str(out_dir), "--head", str(head_dir), "--prompt", "t1", "--cloud", "none"]) == 2
    assert "chosen at export" in capsys.readouterr().err


def test_generate_with_a_missing_head_dir_fails_clearly(tiny, tmp_path, capsys) -> None:
    spec, _, _ = tiny
    missing = tmp_path / "no-such-head"
    assert main(["generate", "--model", spec, "--prompt", "t1", "--exit-layer", str(K), "--cloud", "none", "--head", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "offramp: error:" in err and str(missing) in err and "head.json" in err


class LinkBuilt(Exception):
    """Raised by the stand-in link so the test can read the arguments generate passed."""


def test_generate_passes_token_timeout_and_tls_to_the_ws_link(tiny, tmp_path, monkeypatch) -> None:
    spec, _, _ = tiny
    seen: dict = {}

    def fake_link(url, **kwargs):
        seen.update(kwargs, url=url)
        raise LinkBuilt

    monkeypatch.setattr(ws_link, "WebSocketCloudLink", fake_link)
    base = ["generate", "--model", spec, "--prompt", "t1", "--exit-layer", str(K), "--cloud", "ws://127.0.0.1:9"]
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret\n")
    with pytest.raises(LinkBuilt):
        main([*base, "--cloud-token-file", str(token_file), "--cloud-timeout", "2.5", "--insecure"])
    assert (seen["url"], seen["token"], seen["timeout_s"], seen["verify_tls"]) == ("ws://127.0.0.1:9", "s3cret", 2.5, False)
    assert seen["manifest"]["exit_layer"] == K

    monkeypatch.setenv("OFFRAMP_TOKEN", "edge-env")
    with pytest.raises(LinkBuilt):
        main(base)
    assert (seen["token"], seen["timeout_s"], seen["verify_tls"]) == ("edge-env", 10.0, True)
    monkeypatch.setenv("OFFRAMP_CLOUD_TOKEN", "cloud-env")  # the cloud's own name wins over the edge's
    with pytest.raises(LinkBuilt):
        main(base)
    assert seen["token"] == "cloud-env"
    with pytest.raises(SystemExit):  # the old spelling is gone from generate: --token-file means a server's own token
        main([*base, "--token-file", str(token_file)])


def test_edge_service_uses_the_calibrated_rule(tiny) -> None:
    spec, loaded, head_dir = tiny
    built: list[EdgeService] = []

    def service(**fields) -> EdgeService:
        built.append(EdgeService.open(EdgeConfig(model=spec, exit_layer=K, precision="fp32", workers=1, **fields), loaded=loaded, progress=False))
        return built[-1]

    try:
        calibrated = service()
        assert calibrated.threshold == CALIBRATED and calibrated.exit_setup.head == str(head_dir)
        assert calibrated.confidence == calibrated.exit_setup.rule.confidence
        assert calibrated.describe()["exit_rule"]["threshold_source"] == "calibrated"
        assert service(threshold=0.6).describe()["threshold"] == 0.6
        assert service(trained_head=False).describe()["exit_rule"]["rule"] == "max_prob"
    finally:
        for s in built:
            asyncio.run(s.aclose())
    with pytest.raises(ServiceConfigError, match="chosen at export"):
        EdgeConfig(edge=head_dir, trained_head=False)


def test_local_engine_uses_the_calibrated_rule(tiny) -> None:
    spec, loaded, head_dir = tiny
    with LocalEngine(spec, exit_layer=K, precision="fp32", loaded=loaded, max_sessions=1) as engine:
        assert engine.exit_rule["threshold"] == CALIBRATED and engine.exit_rule["head"] == str(head_dir)
    with LocalEngine(spec, exit_layer=K, precision="fp32", loaded=loaded, threshold=0.7, trained_head=False) as engine:
        assert engine.exit_rule == {"head": "final-norm (untrained)", "rule": "max_prob", "threshold": 0.7, "threshold_source": "flag"}


def test_train_exits_decoder_layer_then_export_bakes_it_in(tmp_path, monkeypatch, capsys) -> None:
    """`offramp train-exits --kind decoder_layer` end to end on a tiny checkpoint, then `offramp export` puts that
    head (and its KV inputs) into the edge directory, and `generate --edge` runs it."""
    from offramp.shared.edge_dir import EdgeDirManifest
    from offramp.shared.edge_manifest import read_manifest

    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))
    spec = str(save_tiny_checkpoint(tmp_path / "ckpt", num_layers=4, seed=5))
    head_dir, out_dir = tmp_path / "head", tmp_path / "edge"
    assert main(["train-exits", "--model", spec, "--exit-layer", str(K), "--quick", "--kind", "decoder_layer",
                 "--head-config", '{"init_layer": 3}', "--steps", "3", "--out", str(head_dir)]) == 0
    assert "calib top-1 agreement" in capsys.readouterr().out
    trained = json.loads((head_dir / "head.json").read_text())
    assert trained["kind"] == "decoder_layer" and trained["config"] == {"init_layer": 3, "zero_output": False}
    assert main(["export", "--model", spec, "--exit-layer", str(K), "--out", str(out_dir), "--precision", "fp32",
                 "--head", str(head_dir)]) == 0
    assert "head decoder_layer" in capsys.readouterr().out
    manifest = EdgeDirManifest.read(out_dir)
    assert manifest.head["kind"] == "decoder_layer" and manifest.head["manifest"]["config"] == trained["config"]
    assert read_manifest(out_dir / manifest.graphs["fp32"])["head_kv_layers"] == 1
    out = generate_json(capsys, spec, "--edge", str(out_dir))  # collaborative (lossless by default) on that graph
    assert len(out["token_ids"]) == 4 and out["edge_dir"] == str(out_dir)
