import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# The Triton interpreter must be switched on before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The tools (checkpoint makers, converters) import as plain modules in tests.
TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _load_tiny_tool():
    import make_tiny_models
    return make_tiny_models, Path(make_tiny_models.__file__)


class TinyModels:
    """tiny_models["llama"] or tiny_models("llama", sharded=True) -> Path of a checkpoint dir, built on first use.

    Cached across sessions under a folder named by a hash of the tool's source, so editing the tool rebuilds.
    """

    def __init__(self):
        self.tool, path = _load_tiny_tool()
        key = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        base = os.environ.get("MISTRALRS_TEST_CACHE") or Path.home() / ".cache" / "mistralrs-tests"
        self.root = Path(base) / f"tiny-{key}"

    def __call__(self, arch: str, *, sharded: bool = False) -> Path:
        final = self.root / (f"{arch}-sharded" if sharded else arch)
        if final.is_dir():
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: another process racing us either wins the rename or loses it
        # cleanly, and nobody ever sees a half-written checkpoint.
        tmp = tempfile.mkdtemp(dir=self.root, prefix=f".{final.name}-")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is a normal shared folder
        try:
            self.tool.write_checkpoint(arch, tmp, sharded=sharded)
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a failed rename is fine only when another process's copy landed
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def __getitem__(self, arch: str) -> Path:
        return self(arch)


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    return TinyModels()


@pytest.fixture(scope="session")
def tiny_sharded_llama(tiny_models) -> Path:
    return tiny_models("llama", sharded=True)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skips = []
    if not config.getoption("--runslow"):
        skips.append(("slow", pytest.mark.skip(reason="slow: run with --runslow")))
    if not torch.cuda.is_available():
        skips.append(("gpu", pytest.mark.skip(reason="needs a CUDA device")))
    for item in items:
        for keyword, marker in skips:
            if keyword in item.keywords:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def gguf_file(tiny_models, tmp_path_factory):
    """gguf_file(arch, type, **options) -> Path of the tiny checkpoint converted by tools/convert_to_gguf.py."""
    import convert_to_gguf
    root, made = tmp_path_factory.mktemp("gguf"), {}

    def make(arch, qtype="f32", **kw):
        key = (arch, qtype, *sorted(kw.items()))
        if key not in made:
            name = "-".join(map(str, [arch, qtype, *kw.values()]))
            made[key] = convert_to_gguf.convert(tiny_models[arch], root / f"{name}.gguf", qtype, **kw)
        return made[key]
    return make


@pytest.fixture(scope="session")
def sentencepiece_llama(tiny_models, tmp_path_factory):
    """The tiny llama with a SentencePiece BPE tokenizer.model (byte fallback, Llama's options) of the same size."""
    spm = pytest.importorskip("sentencepiece")
    ckpt = tmp_path_factory.mktemp("spm") / "llama"
    shutil.copytree(tiny_models["llama"], ckpt)
    (ckpt / "tokenizer.json").unlink()
    lines = [line for text in tiny_models.tool._corpus() for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(ckpt / "tokenizer"), vocab_size=1024, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2)
    return ckpt, spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
