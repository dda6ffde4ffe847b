"""Materialize a model built on the meta device from safetensors files, through a literal rename list."""
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

# Tensors some checkpoints carry that the model recomputes itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# The vision half of image-text checkpoints (Gemma 3, in the hub's layout and in transformers 5's): we run the text
# model alone.
IGNORED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def rename(name: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        name = name.replace(old, new)
    return name


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type, which does not name the file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def read_safetensors(files: list[Path], renames: list[tuple[str, str]], dtype: torch.dtype,
                     device: torch.device, shard=None) -> dict[str, torch.Tensor]:
    """Every tensor of the files, renamed to our module names and cast to `dtype`, with a progress bar. shard (a
    tensor_parallel.shard.Shard): only this rank's slice of each tensor is read."""
    handles = [_open(f) for f in files]
    total = sum(len(h.keys()) for h in handles)
    state = {}
    with tqdm(total=total, desc="Loading weights", unit="tensor", leave=False) as bar:
        for f, h in zip(files, handles):
            for name in h.keys():
                if not name.endswith(IGNORED_SUFFIXES) and not name.startswith(IGNORED_PREFIXES):
                    ours = rename(name, renames)
                    t = h.get_tensor(name) if shard is None else shard.tensor(ours, h.get_slice(name))
                    state[ours] = t.to(device=device, dtype=dtype)
                bar.update()
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Assign `state` to the meta-device `model`, checking names and shapes against what the graph expects."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = getattr(model, "tie_word_embeddings", False) and "lm_head.weight" not in state
    if tied:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing tensors {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                             f"the config implies {tuple(shape)}")
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)
