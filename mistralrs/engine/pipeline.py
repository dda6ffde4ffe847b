"""A loaded model as the Runner sees it."""
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from .model_runner import ModelRunner


@dataclass
class Pipeline:
    """Everything a Runner needs of a loaded model."""
    model_id: str
    model_runner: ModelRunner
    tokenizer: Tokenizer
    chat_template: str | None
    special_tokens: dict
    eos_token_ids: set[int]
    max_model_len: int
    vocab_size: int
    repeat_last_n: int
    device: torch.device
    dtype: torch.dtype
    threads: int  # CPU threads of the engine thread: load's `threads` (a CPU tensor-parallel model's ranks share them)
    whole_prompt_steps: bool  # the model must see a sequence's whole prompt in one step (models/xlora.py)
