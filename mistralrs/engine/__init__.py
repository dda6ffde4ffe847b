"""The serving side, all on the engine thread:

    engine.py         the step loop: inbox -> scheduler -> model runner -> sampling -> scheduler.postprocess -> output
                      -> each request's queue
    scheduler.py      admission by max_seqs and free KV blocks, batching, preemption; block_manager.py's only caller;
                      postprocess: the one writer of a sequence's progress (num_cached, its sampled tokens)
    block_manager.py  which KV blocks each sequence holds, and the free list
    model_runner.py   block tables -> attention metadata, one forward of the model, logits; reads sequences only
    sampling.py       logits -> tokens (bias, penalties, temperature, top-k/top-p, grammar.py's llguidance masks)
    output.py         tokens -> text: incremental detokenization, stop checks, stream hold-back -> neutral records
                      (Delta, Final: text, token ids, raw logprobs); the caller formats them (responses.py)
    sequence.py       a request and its sequences; pipeline.py: the loaded model as the engine sees it
"""
