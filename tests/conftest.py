import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

# The Triton interpreter must be switched on before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _load_tiny_tool():
    path = Path(__file__).resolve().parent.parent / "tools" / "make_tiny_models.py"
    spec = importlib.util.spec_from_file_location("make_tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


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
