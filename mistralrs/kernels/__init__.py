"""The public kernel ops, and the one place that picks an implementation for them.

Every op has a plain-torch reference in `reference.py`; the Triton kernels land behind the same
signatures, and this module is the only code that chooses between the two.
"""
from . import reference

store_kv = reference.store_kv
prefill_attention = reference.paged_attention
decode_attention = reference.paged_attention

__all__ = ["store_kv", "prefill_attention", "decode_attention"]
