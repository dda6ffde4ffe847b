"""One file per architecture: its Args (from_hf, from_gguf), build() of its module graph from layers.py and
linears.py, its Hugging Face and GGUF name maps and its quirks; xlora.py, X-LoRA's classifier and two-pass model
around any of them. They read no files: load/ reads them and fills these graphs."""
