"""`offramp generate`, EdgeService and LocalEngine pick up the trained head + calibrated threshold; flags override.

A tiny random model stands in for `load_model`; OFFRAMP_HOME is a tmp dir so the machine's real artifacts are
never read.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

import offramp.models as models_pkg
from offramp.edge.sessions import EdgeService, EngineConfig
from offramp.models.exit_heads import build_head, save_head
from offramp.models.fingerprint import model_fingerprint
from offramp.shared.exit_rule import ExitRule, save_exit_rule
from offramp.models.train_exits import default_head_dir
from offramp.shared.cli import main
from tests.conftest import make_tiny_llama

K = 2
CALIBRATED = 0.42


class TinyTokenizer:
    """Just what generate and EdgeService touch: ids in, ids out."""

    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [3 + (ord(c) % 100) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)

    def get_vocab(self) -> dict:
        return {}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny model served by `load_model`, with a trained head + router.json at train-exits' default place."""
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))
    for env in ("OFFRAMP_TOKEN", "OFFRAMP_CLOUD_TOKEN"):
        monkeypatch.delenv(env, raising=False)
    model = make_tiny_llama(num_layers=4, seed=5)
    tokenizer = TinyTokenizer()
    monkeypatch.setattr(models_pkg, "load_model", lambda spec: (model, tokenizer))
    head_dir = default_head_dir(model_fingerprint(model), K)
    torch.manual_seed(0)
    save_head(build_head("residual_mlp", model, {"width": 16, "depth": 1}), head_dir,
              {"exit_layer": K, "model_fingerprint": model_fingerprint(model)})
    save_exit_rule(ExitRule("logistic", CALIBRATED, [1.0, 0, 0, 0, 0, 0], 0.0, [0.0] * 6, [1.0] * 6), head_dir)
    return model, tokenizer, head_dir


def generate_json(capsys, *flags: str) -> dict:
    argv = ["generate", "--model", "tiny", "--prompt", "hello", "--exit-layer", str(K), "--max-new-tokens", "4",
            "--edge-precision", "torch", "--cloud", "local", "--json", *flags]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_reports_the_trained_head_and_calibrated_threshold(tiny, capsys) -> None:
    _, _, head_dir = tiny
    out = generate_json(capsys)
    assert out["exit_rule"] == {"head": str(head_dir), "rule": "logistic", "threshold": CALIBRATED,
                                "threshold_source": "calibrated"}
    assert out["threshold"] == CALIBRATED and len(out["token_ids"]) == 4  # the old keys are still there
    assert {"sources", "mode", "exit_layer", "stats"} <= out.keys()


def test_generate_flags_override_the_calibration(tiny, capsys) -> None:
    _, _, head_dir = tiny
    out = generate_json(capsys, "--threshold", "2")
    assert out["exit_rule"]["threshold_source"] == "flag" and out["threshold"] == 2.0
    assert out["exit_rule"]["head"] == str(head_dir) and out["stats"]["edge_exits"] == 0  # 2 never exits
    plain = generate_json(capsys, "--no-trained-head")
    assert plain["exit_rule"] == {"head": "final-norm (untrained)", "rule": "max_prob", "threshold": 0.9,
                                  "threshold_source": "default"}


def test_generate_without_artifacts_keeps_the_old_behaviour(tiny, capsys) -> None:
    _, _, head_dir = tiny
    for path in head_dir.iterdir():
        path.unlink()
    out = generate_json(capsys)
    assert out["exit_rule"]["head"] == "final-norm (untrained)" and out["threshold"] == 0.9


def test_generate_with_a_missing_head_dir_fails_clearly(tiny, tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-head"
    assert main(["generate", "--model", "tiny", "--prompt", "hi", "--exit-layer", str(K), "--edge-precision", "torch",
                 "--cloud", "none", "--head", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "offramp: error:" in err and str(missing) in err and "head.json" in err


class LinkBuilt(Exception):
    """Raised by the stand-in link so the test can read the arguments generate passed."""


def test_generate_passes_token_timeout_and_tls_to_the_ws_link(tiny, tmp_path, monkeypatch) -> None:
    ws_link = pytest.importorskip("offramp.edge.ws_link")
    seen: dict = {}

    def fake_link(url, **kwargs):
        seen.update(kwargs, url=url)
        raise LinkBuilt

    monkeypatch.setattr(ws_link, "WebSocketCloudLink", fake_link)
    base = ["generate", "--model", "tiny", "--prompt", "hi", "--exit-layer", str(K), "--edge-precision", "torch",
            "--cloud", "ws://127.0.0.1:9"]
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret\n")
    with pytest.raises(LinkBuilt):
        main([*base, "--token-file", str(token_file), "--cloud-timeout", "2.5", "--insecure"])
    assert (seen["url"], seen["token"], seen["timeout_s"], seen["verify_tls"]) == ("ws://127.0.0.1:9", "s3cret", 2.5, False)
    assert seen["manifest"]["exit_layer"] == K

    monkeypatch.setenv("OFFRAMP_TOKEN", "from-env")
    with pytest.raises(LinkBuilt):
        main(base)
    assert (seen["token"], seen["timeout_s"], seen["verify_tls"]) == ("from-env", 10.0, True)


def test_edge_service_uses_the_calibrated_rule(tiny) -> None:
    model, tokenizer, head_dir = tiny

    built: list[EdgeService] = []

    def service(**fields) -> EdgeService:
        built.append(EdgeService(model, tokenizer, EngineConfig(exit_layer=K, precision="torch", workers=1, **fields)))
        return built[-1]

    try:
        calibrated = service()
        assert calibrated.threshold == CALIBRATED and calibrated.exit_setup.head_dir == head_dir
        assert calibrated.confidence == calibrated.exit_setup.rule.confidence
        assert calibrated.describe()["exit_rule"]["threshold_source"] == "calibrated"
        assert service(threshold=0.6).describe()["threshold"] == 0.6
        assert service(trained_head=False).describe()["exit_rule"]["rule"] == "max_prob"
    finally:
        for s in built:
            asyncio.run(s.aclose())


def test_local_engine_uses_the_calibrated_rule(tiny) -> None:
    from offramp.edge.local import LocalEngine

    model, tokenizer, head_dir = tiny
    with LocalEngine("tiny", exit_layer=K, loaded=(model, tokenizer), max_sessions=1) as engine:
        assert engine.exit_rule["threshold"] == CALIBRATED and engine.exit_rule["head"] == str(head_dir)
    with LocalEngine("tiny", exit_layer=K, loaded=(model, tokenizer), threshold=0.7, trained_head=False) as engine:
        assert engine.exit_rule == {"head": "final-norm (untrained)", "rule": "max_prob", "threshold": 0.7,
                                    "threshold_source": "flag"}
