"""The loading side: files -> a model file's modules and a tokenizer -> the Pipeline a Runner serves.

    model.py              the pipeline (loader.py calls it): read, the post-build passes in order, KV cache, memory
    hub.py                a local directory, or huggingface_hub's cache and downloads
    safetensors.py        checkpoints -> state dicts through each model file's rename list
    gguf.py, ggml.py      GGUF files (bounds-checked, through gguf-py) and legacy GGJT files -> metadata + raw tensors
    gguf_model.py         raw tensors -> a model, quantized weights kept as their blocks
    tokenizer.py          tokenizer.json or the GGUF vocabulary (gguf_tokenizer.py), EOS ids; chat_template.py
    xlora.py              X-LoRA ordering, config, adapter and classifier files
"""
