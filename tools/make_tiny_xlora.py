"""Write a tiny X-LoRA repo with PEFT on a tiny checkpoint, and build PEFT's X-LoRA model from such a repo.

    python tools/make_tiny_xlora.py BASE_DIR OUT_DIR [--depth 2] [--layerwise]

OUT_DIR gets the layout of the original xlora package, which mistral.rs read:
    xlora_config.json               PEFT's XLoraConfig fields (hidden_size, xlora_depth, xlora_size, ...)
    xlora_classifier.safetensors    internal_xlora_classifier.layers.{i}.{weight,bias} (nn.Sequential indices)
    <adapter name>/                 adapter_config.json + adapter_model.safetensors of each LoRA adapter
    ordering.json                   {"order": [names], "layers": {module: index}, "base_model_id": BASE_DIR}

PEFT 0.21's own save_pretrained is not used: it names the adapter subfolders "0".."N-1" and drops every classifier
tensor whose name contains ".<adapter index>." (so layers.0 of a depth >= 2 classifier). PEFT 0.21's XLoraModel also
activates the adapters under their config names while it loaded them as "0".."N-1", so its forward fails unless the
adapters are re-activated under the loaded names; peft_xlora() does that, and touches nothing else.
"""
import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTERS = (  # name, rank, alpha, use_rslora, also the extra target: ranks and targets differ on purpose
    ("adapter_1", 4, 8, False, False),
    ("adapter_2", 8, 12, True, False),
    ("adapter_3", 2, 5, False, True),
)
TARGETS = {  # model_type -> (targets of every adapter, the extra one); Mixtral's experts are fused parameters
    "llama": (["q_proj", "v_proj", "down_proj"], "o_proj"),
    "mistral": (["q_proj", "v_proj", "down_proj"], "o_proj"),
    "gemma": (["q_proj", "v_proj", "down_proj"], "o_proj"),
    "gemma2": (["q_proj", "v_proj", "down_proj"], "o_proj"),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], "o_proj"),
    "phi": (["q_proj", "v_proj", "fc2"], "dense"),
    "mixtral": (["q_proj", "v_proj"], "o_proj"),
}


def _hf_model(base_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    model.config.use_cache = False  # PEFT's X-LoRA refuses a model that caches
    return model.eval()


def write_adapters(base_dir, out_dir: Path, seed: int = 0) -> list[str]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    common, extra = TARGETS[json.loads((Path(base_dir) / "config.json").read_text())["model_type"]]
    for name, r, alpha, rslora, more in ADAPTERS:
        targets = common + [extra] * more
        # init_lora_weights=False: random lora_B, so every adapter changes the output.
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, lora_dropout=0.1,
                         init_lora_weights=False, task_type="CAUSAL_LM")
        get_peft_model(_hf_model(base_dir), cfg).save_pretrained(out_dir / name)
        (out_dir / name / "README.md").unlink(missing_ok=True)
    return [a[0] for a in ADAPTERS]


def peft_xlora(base_dir, xlora_dir):
    """PEFT's X-LoRA model built from the files of an X-LoRA repo written by write_xlora."""
    from peft import XLoraConfig, get_peft_model

    xlora_dir = Path(xlora_dir)
    fields = json.loads((xlora_dir / "xlora_config.json").read_text())
    order = json.loads((xlora_dir / "ordering.json").read_text())["order"]
    fields["adapters"] = {name: str(xlora_dir / name) for name in order}
    fields = {k: v for k, v in fields.items() if k in XLoraConfig.__dataclass_fields__}
    model = get_peft_model(_hf_model(base_dir), XLoraConfig(**fields))
    model.base_model.lora_model.set_adapter([str(i) for i in range(len(order))])  # see the module docstring
    classifier = {k.removeprefix("internal_xlora_classifier."): v
                  for k, v in load_file(xlora_dir / "xlora_classifier.safetensors").items()}
    model.base_model.internal_xlora_classifier.load_state_dict(classifier, strict=False)
    missing = set(model.base_model.internal_xlora_classifier.state_dict()) - set(classifier)
    assert not missing, missing
    return model.eval()


def ordering(model, names: list[str], base_model_id: str | None) -> dict:
    """As mistral.rs's scripts/create_ordering.py: every LoRA linear in named_modules() order, keyed by its name in
    the base model (PEFT's X-LoRA numbers its layers in the same module order)."""
    from peft.tuners import lora

    layers, prefix = {}, "base_model.lora_model.model."
    for name, module in model.named_modules():
        if isinstance(module, lora.Linear):
            layers[name.removeprefix(prefix)] = len(layers)
    out = {"order": names, "layers": layers}
    if base_model_id is not None:
        out["base_model_id"] = base_model_id
    return out


def write_xlora(base_dir, out_dir, *, depth: int = 1, layerwise: bool = False, xlora_size: int = 32,
                temperature: float = 0.7, global_scaling_weight: float = 1.3, seed: int = 0) -> Path:
    from peft import XLoraConfig, get_peft_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = write_adapters(base_dir, out_dir, seed)
    hf = _hf_model(base_dir)
    fields = dict(hidden_size=hf.config.hidden_size, xlora_depth=depth, xlora_size=xlora_size,
                  layerwise_scalings=layerwise, softmax_temperature=temperature,
                  global_scaling_weight=global_scaling_weight)
    model = get_peft_model(hf, XLoraConfig(task_type="CAUSAL_LM", **fields,
                                           adapters={n: str(out_dir / n) for n in names}))
    classifier = model.base_model.internal_xlora_classifier
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in classifier.parameters():  # PEFT's init gives near-uniform scalings; make them differ per token
            p.copy_(torch.randn_like(p) * 0.3)
    save_file({f"internal_xlora_classifier.{k}": v.contiguous() for k, v in classifier.state_dict().items()},
              out_dir / "xlora_classifier.safetensors")
    config = model.peft_config["default"].to_dict()
    config["adapters"] = {n: n for n in names}
    config["peft_type"] = str(config["peft_type"].value if hasattr(config["peft_type"], "value")
                              else config["peft_type"])
    config["task_type"] = str(config["task_type"])
    config.pop("_subfolders", None)
    (out_dir / "xlora_config.json").write_text(json.dumps(config, indent=2, default=str))
    (out_dir / "ordering.json").write_text(json.dumps(ordering(model, names, str(base_dir)), indent=2))
    return out_dir


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base_dir")
    p.add_argument("out_dir")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--layerwise", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_xlora(a.base_dir, Path(tmp) / "x", depth=a.depth, layerwise=a.layerwise)
        shutil.copytree(Path(tmp) / "x", a.out_dir, dirs_exist_ok=True)
    print(f"wrote {a.out_dir}")


if __name__ == "__main__":
    main()
