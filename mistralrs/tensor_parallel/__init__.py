"""Tensor parallelism, Megatron-style, on torch.distributed (NCCL on GPUs, gloo on the CPU).

Each of N ranks holds 1/N of every large weight, cut where no communication is needed until a sum:
  column-parallel  q/k/v, gate/up, fc1, the experts' w1/w3: output rows split (whole heads, intermediate features)
  row-parallel     o, down, fc2, the experts' w2: input columns split, so each rank's product is a partial sum; one
                   all-reduce after attention and one after the MLP (layers.py's blocks) adds them up. Their biases
                   are rank 0's alone (zeros elsewhere), so the sum counts them once.
  vocab-parallel   embed_tokens, lm_head: rows of the vocabulary split, ceil(V / N) a rank (the last padded with
                   zero rows); a lookup is masked to the rank's rows and all-reduced, the logits gathered on rank 0
  replicated       norms, the router of a mixture of experts, everything else.
KV heads go with the query heads that read them; with fewer KV heads than ranks, each rank holds the one KV head its
query heads read.

    shard.py    which slice of each tensor a rank holds (Shard), and its shard's hyperparameters (local_args): a rank
                builds its model from those and loads only its slices of the files
    group.py    the process group: the collectives (all-reduce, the vocabulary gather), join_ranks (a loaded shard
                made one rank of the model), and the wire format of the step rank 0 broadcasts before each forward
    workers.py  the ranks' processes: rank 0 spawns the others (or joins torchrun's group); ranks > 0 load their
                shard and run rank 0's steps until it closes the model
Rank 0 runs the Runner; its model runner sends each step (group.py) before running it.
"""
from .group import TensorParallelError  # noqa: F401  (what a caller of a failed model catches)
