"""Model specs resolve to local checkpoints; anything else is a clear error naming what was given."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from offramp.models import checkpoints, load_model
from offramp.models.checkpoints import default_gguf_path, resolve_checkpoint
from offramp.shared.errors import ModelSpecError
from tests.conftest import make_tiny_llama


def test_local_hf_directory_loads(tmp_path) -> None:
    model = make_tiny_llama(cpu_layout=False)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(resolve_checkpoint("default")).save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path)
    assert resolve_checkpoint(tmp_path) == tmp_path
    assert not loaded.training and tok.eos_token_id is not None
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_missing_path_is_named_in_the_error(tmp_path) -> None:
    spec = str(tmp_path / "nowhere")
    with pytest.raises(ModelSpecError, match="nowhere"):
        load_model(spec)


def test_directory_without_config_is_refused(tmp_path) -> None:
    with pytest.raises(ModelSpecError, match="without config.json"):
        resolve_checkpoint(tmp_path)


def test_non_gguf_file_is_refused(tmp_path) -> None:
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"\0" * 16)
    with pytest.raises(ModelSpecError, match="weights.bin"):
        resolve_checkpoint(bogus)


def test_default_gguf_is_found_in_the_wheel() -> None:
    path = default_gguf_path()
    assert path.suffix == ".gguf" and "SmolLM2-135M-Instruct" in path.name and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_default_model_is_converted_once_and_then_read_from_cache(default_model, monkeypatch) -> None:
    model, tok = default_model  # conversion (if any) happened here
    cached = resolve_checkpoint("default")
    weights = next(cached.glob("*.safetensors"))
    before = weights.stat().st_mtime

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(checkpoints.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert resolve_checkpoint(default_gguf_path()) == cached  # the GGUF path maps to the same cache entry
    assert weights.stat().st_mtime == before
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert tok.decode(tok("Paris is lovely")["input_ids"]) == "Paris is lovely"
    assert next(model.parameters()).dtype == torch.float32
