"""Edge part + cloud part reproduce the full model; unsupported models fail at split time."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from offramp.models import split_model
from offramp.models.split import CloudPart, EdgePart
from offramp.shared.errors import SplitConfigError, UnsupportedArchitectureError
from tests.conftest import make_tiny_llama


def split_greedy(model, exit_layer: int, prompt_ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Prefill then single-token steps, every token escalated: edge layers then cloud layers."""
    edge, cloud = split_model(model, exit_layer)
    ids = torch.tensor([prompt_ids])
    positions = torch.arange(len(prompt_ids))[None]
    with torch.inference_mode():
        out = edge(ids, positions)
        logits, cloud_kv = cloud(out.hidden, positions)
        edge_kv, tokens, length = out.present, [], len(prompt_ids)
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            if token == eos:
                break
            positions = torch.tensor([[length]])
            length += 1
            out = edge(torch.tensor([[token]]), positions, edge_kv)
            edge_kv = out.present
            logits, cloud_kv = cloud(out.hidden, positions, cloud_kv)
    return tokens


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_composition_matches_full_forward_on_tiny_model(exit_layer: int) -> None:
    model = make_tiny_llama(num_layers=4, seed=exit_layer)
    ids = torch.randint(0, 128, (1, 23))
    positions = torch.arange(23)[None]
    edge, cloud = split_model(model, exit_layer)
    with torch.inference_mode():
        logits, _ = cloud(edge(ids, positions).hidden, positions)
        expected = model(ids).logits
    assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()


def test_whole_model_cloud_part_is_the_full_model() -> None:
    """The cloud-only baseline runs every layer through the same CloudPart code."""
    model = make_tiny_llama(num_layers=4, seed=5)
    ids = torch.randint(0, 128, (1, 17))
    whole = CloudPart(model, 0, whole_model=True)
    with torch.inference_mode():
        logits, present = whole(model.model.embed_tokens(ids), torch.arange(17)[None])
        expected = model(ids).logits
    assert torch.allclose(logits, expected, atol=1e-5) and len(present) == 4
    with pytest.raises(SplitConfigError):
        CloudPart(model, 0)


@pytest.mark.parametrize("exit_layer", [1, 3])
def test_split_greedy_equals_generate_on_tiny_model(exit_layer: int) -> None:
    model = make_tiny_llama(num_layers=4, seed=7)
    for length in (1, 5, 40):
        prompt = torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        assert split_greedy(model, exit_layer, prompt, 20) == reference_greedy(model, prompt, 20)


def test_chunked_prefill_with_past_matches_one_shot() -> None:
    """A prefill chunk on top of a cache (the cloud's catch-up) sees exactly the positions it should."""
    model = make_tiny_llama(num_layers=4, seed=3)
    edge, cloud = split_model(model, 2)
    ids = torch.randint(0, 128, (1, 30))
    pos = torch.arange(30)[None]
    with torch.inference_mode():
        whole = cloud(edge(ids, pos).hidden, pos)[0]
        first = edge(ids[:, :11], pos[:, :11])
        second = edge(ids[:, 11:], pos[:, 11:], first.present)
        logits_a, kv = cloud(first.hidden, pos[:, :11])
        logits_b, _ = cloud(second.hidden, pos[:, 11:], kv)
    assert torch.allclose(torch.cat([logits_a, logits_b], dim=1), whole, atol=1e-5)


def test_split_takes_any_head_module() -> None:
    model = make_tiny_llama()
    head = torch.nn.Linear(64, 128)
    edge = EdgePart(model, 2, head)
    ids = torch.tensor([[1, 2, 3]])
    out = edge(ids, torch.arange(3)[None])
    assert torch.equal(out.exit_logits, head(out.hidden))


@pytest.mark.parametrize("bad", [0, 4, -1, 99])
def test_exit_layer_out_of_range_is_a_clear_error(bad: int) -> None:
    with pytest.raises(SplitConfigError, match=f"exit layer {bad}"):
        split_model(make_tiny_llama(num_layers=4), bad)


def test_unsupported_architecture_fails_at_split_time() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        EdgePart(gpt2, 1)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        CloudPart(gpt2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("exit_layer", [10, 15])
def test_split_greedy_equals_generate_on_default_model(default_model, exit_layer: int) -> None:
    model, tok = default_model
    chat = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True, tokenize=False)
    prompts = [
        "Hi",
        "The capital of France is",
        "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter who",
        chat,
    ]
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        ref = reference_greedy(model, ids, 24)
        assert split_greedy(model, exit_layer, ids, 24, tok.eos_token_id) == ref, prompt
