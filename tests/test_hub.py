import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mistralrs.load import hub

from helpers import HF_ENV, commit_hash, make_fake_hub_repo

HUB_PY = Path(__file__).resolve().parent.parent / "mistralrs" / "load" / "hub.py"
# The default .gitattributes of a hub repo sends these to LFS; their blobs are named by sha256, the rest by git sha1.


# hub.py is loaded by path, not through the package: `import mistralrs` would pull in torch and the engine, seconds
# per subprocess. It needs nothing from the package.
_PRELUDE = f"""
import dataclasses, importlib.util, json, logging, sys
from pathlib import Path

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
spec = importlib.util.spec_from_file_location("hub", {str(HUB_PY)!r})
hub = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hub)

def jsonable(v):
    if isinstance(v, hub.ModelFiles):
        return {{k: jsonable(x) for k, x in dataclasses.asdict(v).items()}}
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    return str(v) if isinstance(v, Path) else v

results = []
for expr in json.loads(sys.argv[1]):
    try:
        results.append({{"value": jsonable(eval(expr))}})
    except Exception as e:
        results.append({{"error": type(e).__name__, "message": str(e)}})
print(json.dumps(results))
"""


def run_hub(hf_home: Path, *exprs: str, offline: bool = True, env: dict | None = None) -> tuple[list[dict], str]:
    """Evaluate `exprs` (using `hub`) in a fresh interpreter with HF_HOME=hf_home (and HF_HUB_OFFLINE=1):
    huggingface_hub reads both into its constants at import, so only a new process sees them faithfully.
    Returns ([{"value": ...} or {"error": class name, "message": ...}], stderr)."""
    child_env = {k: v for k, v in os.environ.items() if k not in HF_ENV}
    child_env.update(HF_HOME=str(hf_home), **({"HF_HUB_OFFLINE": "1"} if offline else {}), **(env or {}))
    # cwd=hf_home: a directory named like the repo id in the cwd would be taken as a local model directory
    proc = subprocess.run([sys.executable, "-c", _PRELUDE, json.dumps(exprs)], env=child_env, cwd=hf_home,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def _json_file(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _text_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _safetensors(path: Path, **tensors) -> Path:
    save_file({k: torch.full((2, 2), float(v)) for k, v in tensors.items()}, str(path))
    return path


MAIN, OLD = commit_hash("main"), commit_hash("v1")
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory) -> Path:
    """HF_HOME with tiny/llama: main (newer) is sharded with tokenizer and generation config, refs/v1 (older) has a
    single model.safetensors, no tokenizer.json, no generation_config.json. Plus tiny/noweights (config only)."""
    src, hf_home = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("hf_home")
    tok_cfg = _json_file(src / "tokenizer_config.json", {"eos_token": "</s>"})
    new = {
        "config.json": _json_file(src / "config_new.json", {"model_type": "llama", "rev": "new"}),
        "tokenizer.json": _json_file(src / "tokenizer.json", {"version": "1.0"}),
        "tokenizer_config.json": tok_cfg,
        "generation_config.json": _json_file(src / "generation_config.json", {"eos_token_id": 2}),
        "chat_template.jinja": _text_file(src / "chat_template.jinja", "{{ messages[0]['content'] }}"),
        "chat_template.json": _json_file(src / "chat_template.json", {"chat_template": "{{ 1 }}"}),
        # weight_map lists shard 2 first: the result must still be in shard order
        "model.safetensors.index.json": _json_file(src / "index.json", {"metadata": {}, "weight_map": {
            "b": SHARDS[1], "a": SHARDS[0], "c": SHARDS[1]}}),
        SHARDS[0]: _safetensors(src / "s1.safetensors", a=1),
        SHARDS[1]: _safetensors(src / "s2.safetensors", b=2, c=3),
        "consolidated.safetensors": _safetensors(src / "consolidated.safetensors", a=1, b=2, c=3),
    }
    old = {
        "config.json": _json_file(src / "config_old.json", {"model_type": "llama", "rev": "old"}),
        "tokenizer_config.json": tok_cfg,
        "model.safetensors": _safetensors(src / "single.safetensors", a=1, b=2, c=3),
    }
    make_fake_hub_repo(hf_home, "tiny/llama", [(OLD, old), (MAIN, new)], {"main": MAIN, "v1": OLD})
    make_fake_hub_repo(hf_home, "tiny/noweights", [(MAIN, {"config.json": new["config.json"]})], {"main": MAIN})
    return hf_home


def test_fake_repo_is_a_valid_hub_cache(fake_hub):
    info = {r.repo_id: r for r in huggingface_hub.scan_cache_dir(fake_hub / "hub").repos}
    revs = {r.commit_hash: r for r in info["tiny/llama"].revisions}
    assert set(revs) == {MAIN, OLD}
    assert revs[MAIN].refs == {"main"} and revs[OLD].refs == {"v1"}
    assert {f.file_name for f in revs[OLD].files} == {"config.json", "tokenizer_config.json", "model.safetensors"}
    # tokenizer_config.json is identical in both revisions, so both snapshots share one blob, as on the hub
    blob = {(r.commit_hash, f.file_name): f.blob_path for r in revs.values() for f in r.files}
    assert blob[MAIN, "tokenizer_config.json"] == blob[OLD, "tokenizer_config.json"]
    assert blob[MAIN, "config.json"] != blob[OLD, "config.json"]
    single = Path(blob[OLD, "model.safetensors"])  # LFS blobs are named by sha256, git blobs by git's sha1
    assert single.name == hashlib.sha256(single.read_bytes()).hexdigest()
    config = Path(blob[OLD, "config.json"]).read_bytes()
    assert Path(blob[OLD, "config.json"]).name == hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    path = huggingface_hub.try_to_load_from_cache("tiny/llama", "config.json", revision="v1",
                                                  cache_dir=fake_hub / "hub")
    assert json.loads(Path(path).read_text())["rev"] == "old"


def _rev(files: dict) -> str:
    return json.loads(Path(files["value"]["config"]).read_text())["rev"]


def test_revisions_offline(fake_hub):
    (main, default, v1, by_hash), _ = run_hub(
        fake_hub, "hub.model_files('tiny/llama', revision='main')", "hub.model_files('tiny/llama')",
        "hub.model_files('tiny/llama', revision='v1')", f"hub.model_files('tiny/llama', revision={OLD!r})")
    assert main == default
    assert _rev(main) == "new" and _rev(v1) == "old" and v1 == by_hash
    assert f"snapshots/{MAIN}/" in main["value"]["config"] and f"snapshots/{OLD}/" in v1["value"]["config"]
    assert [Path(p).name for p in main["value"]["weights"]] == SHARDS  # sorted, unique, no consolidated.safetensors
    assert [Path(p).name for p in v1["value"]["weights"]] == ["model.safetensors"]
    keys = [set(safe_open(p, "pt").keys()) for p in main["value"]["weights"] + v1["value"]["weights"]]
    assert keys == [{"a"}, {"b", "c"}, {"a", "b", "c"}]
    assert Path(main["value"]["tokenizer_json"]).name == "tokenizer.json"
    assert Path(main["value"]["generation_config"]).name == "generation_config.json"
    # absent from the cached v1 snapshot, so absent offline
    assert v1["value"]["tokenizer_json"] is None and v1["value"]["generation_config"] is None
    assert Path(main["value"]["chat_template_jinja"]).read_text() == "{{ messages[0]['content'] }}"
    assert json.loads(Path(main["value"]["chat_template_json"]).read_text()) == {"chat_template": "{{ 1 }}"}
    assert v1["value"]["chat_template_jinja"] is None and v1["value"]["chat_template_json"] is None
    assert Path(v1["value"]["tokenizer_config"]).read_text() == Path(main["value"]["tokenizer_config"]).read_text()


def test_missing_file_offline(fake_hub):
    (missing, optional, shard_in_old, no_weights, no_weights_ok), _ = run_hub(
        fake_hub, "hub.repo_file('tiny/llama', 'nope.json', revision='v1')",
        "hub.optional_repo_file('tiny/llama', 'nope.json')",
        f"hub.repo_file('tiny/llama', {SHARDS[0]!r}, revision='v1')",
        "hub.model_files('tiny/noweights')", "hub.model_files('tiny/noweights', weights=False).weights")
    assert missing["error"] == "_AbsentFile" and "nope.json" in missing["message"] and "'v1'" in missing["message"]
    assert "tiny/llama" in missing["message"]
    assert optional == {"value": None}
    assert shard_in_old["error"] == "_AbsentFile" and SHARDS[0] in shard_in_old["message"]
    assert no_weights["error"] == "FileNotFoundError" and "no safetensors weights" in no_weights["message"]
    assert "tiny/noweights" in no_weights["message"] and "'main'" in no_weights["message"]
    assert no_weights_ok == {"value": []}


def test_unknown_revision_and_repo_offline(fake_hub):
    (rev, optional_rev, unknown_hash, repo, bad_id), _ = run_hub(
        fake_hub, "hub.model_files('tiny/llama', revision='nope')",
        "hub.optional_repo_file('tiny/llama', 'tokenizer.json', revision='nope')",
        f"hub.repo_file('tiny/llama', 'config.json', revision={commit_hash('x')!r})",
        "hub.model_files('tiny/absent')", "hub.model_files('/no/such/dir')")
    for err in (rev, optional_rev, unknown_hash, repo):  # an unknown revision is not "file absent": it raises
        assert err["error"] == "FileNotFoundError" and "not in the local cache" in err["message"], err
        assert "HF_HUB_OFFLINE" in err["message"]
    assert "'nope'" in rev["message"] and "config.json" in rev["message"]
    assert commit_hash("x") in unknown_hash["message"] and "'tiny/absent'" in repo["message"]
    assert bad_id["error"] == "ValueError" and "'/no/such/dir'" in bad_id["message"]
    assert "local directory" in bad_id["message"]


def test_tokenizer_json_override_offline(fake_hub, tmp_path):
    tok = _json_file(tmp_path / "my_tokenizer.json", {})
    (override, missing), _ = run_hub(
        fake_hub, f"hub.model_files('tiny/llama', revision='v1', tokenizer_json={str(tok)!r}).tokenizer_json",
        f"hub.model_files('tiny/llama', tokenizer_json={str(tmp_path / 'nope.json')!r})")
    assert override == {"value": str(tok)}
    assert missing["error"] == "FileNotFoundError" and "tokenizer_json" in missing["message"]
    assert "nope.json" in missing["message"]


@pytest.fixture
def local_model(tmp_path) -> Path:
    _json_file(tmp_path / "config.json", {"model_type": "llama"})
    _json_file(tmp_path / "tokenizer.json", {})
    _safetensors(tmp_path / "model.safetensors", a=1)
    _safetensors(tmp_path / "consolidated.safetensors", a=1)
    return tmp_path


def test_local_directory(local_model, tmp_path):
    files = hub.model_files(str(local_model), revision="ignored-for-local-dirs")
    assert files.config == local_model / "config.json" and files.tokenizer_json == local_model / "tokenizer.json"
    assert files.tokenizer_config is None and files.generation_config is None
    assert files.weights == [local_model / "model.safetensors"]
    assert hub.optional_repo_file(str(local_model), "generation_config.json") is None
    with pytest.raises(FileNotFoundError, match="generation_config.json.*local model directory"):
        hub.repo_file(str(local_model), "generation_config.json")
    other = _json_file(local_model / "other.json", {})
    assert hub.model_files(str(local_model), tokenizer_json=str(other)).tokenizer_json == other
    with pytest.raises(FileNotFoundError, match="tokenizer_json"):
        hub.model_files(str(local_model), tokenizer_json=str(tmp_path / "missing.json"))


def test_local_directory_sharded_and_missing(tmp_path):
    _json_file(tmp_path / "config.json", {})
    _json_file(tmp_path / "model.safetensors.index.json", {"weight_map": {"x": SHARDS[1], "y": SHARDS[0]}})
    for name in SHARDS:
        _safetensors(tmp_path / name, x=0)
    assert hub.model_files(str(tmp_path)).weights == [tmp_path / s for s in SHARDS]
    (tmp_path / SHARDS[1]).unlink()
    with pytest.raises(FileNotFoundError, match=SHARDS[1]):
        hub.model_files(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hub.model_files(str(tmp_path))


@pytest.fixture
def no_hf_env(monkeypatch):
    for name in HF_ENV:
        monkeypatch.delenv(name, raising=False)


def test_token_sources(no_hf_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MY_TOKEN", " hf_env\n")
    (tmp_path / "token").write_text("hf_file\n")
    assert hub.resolve_token("literal", " hf_lit ") == "hf_lit"
    assert hub.resolve_token("envvar", "MY_TOKEN") == "hf_env"
    assert hub.resolve_token("path", str(tmp_path / "token")) == "hf_file"
    assert hub.resolve_token("none") is False
    assert hub.resolve_token("none", None) is False
    monkeypatch.setenv("HF_TOKEN", " hf_cached \n")
    assert hub.resolve_token() == "hf_cached" and hub.resolve_token("cache", None) == "hf_cached"


@pytest.mark.parametrize("source, value, error, match", [
    ("bogus", None, ValueError, "token_source must be one of 'cache', 'literal', 'envvar', 'path', 'none'"),
    ("literal", None, ValueError, "needs token_source_value"),
    ("envvar", None, ValueError, "needs token_source_value"),
    ("path", None, ValueError, "needs token_source_value"),
    ("cache", "hf_x", ValueError, "takes no token_source_value"),
    ("none", "hf_x", ValueError, "takes no token_source_value"),
    ("envvar", "MISTRALRS_UNSET_TOKEN_VAR", ValueError, "MISTRALRS_UNSET_TOKEN_VAR.*not set"),
    ("envvar", "MISTRALRS_EMPTY_TOKEN_VAR", ValueError, "MISTRALRS_EMPTY_TOKEN_VAR.*empty"),
    ("literal", "  ", ValueError, "token_source_value is empty"),
    ("path", "{tmp}/missing", FileNotFoundError, "missing"),
    ("path", "{tmp}/empty", ValueError, "empty"),
    ("path", "{tmp}", FileNotFoundError, "missing or not a file"),
])
def test_token_source_errors(source, value, error, match, no_hf_env, monkeypatch, tmp_path):
    monkeypatch.delenv("MISTRALRS_UNSET_TOKEN_VAR", raising=False)
    monkeypatch.setenv("MISTRALRS_EMPTY_TOKEN_VAR", " ")
    (tmp_path / "empty").write_text("\n")
    value = value.format(tmp=tmp_path) if value else value
    with pytest.raises(error, match=match) as info:
        hub.resolve_token(source, value)
    assert "hf_x" not in str(info.value)  # a misplaced token is never echoed


def test_cache_token_from_hf_home_and_anonymous_fallback(tmp_path):
    home, empty = tmp_path / "home", tmp_path / "empty"
    home.mkdir(), empty.mkdir()
    (home / "token").write_text("  hf_stored\n")
    [stored], _ = run_hub(home, "hub.resolve_token('cache')")
    [from_env], _ = run_hub(home, "hub.resolve_token('cache')", env={"HF_TOKEN": " hf_env "})
    [anonymous], log = run_hub(empty, "hub.resolve_token()")
    assert stored == {"value": "hf_stored"} and from_env == {"value": "hf_env"}
    assert anonymous == {"value": False} and "anonymous" in log


class _HubErrors(BaseHTTPRequestHandler):
    """A stand-in Hub that only answers errors, as the Hub does: huggingface_hub picks its exception class from the
    status and the X-Error-Code header. Paths are /<namespace>/<name>/resolve/<revision>/<file>."""

    ERRORS = {"missing": (401, "RepoNotFound"), "gated": (403, "GatedRepo"), "badtoken": (401, None),
              "teapot": (418, None)}

    def do_HEAD(self):
        parts = self.path.split("/")
        if len(parts) != 6 or parts[3] != "resolve":
            status, code = 404, None
        else:
            missing = "RevisionNotFound" if parts[4] == "nope" else "EntryNotFound"
            status, code = self.ERRORS.get(parts[2], (404, missing))
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubErrors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_hub_errors_online(hub_endpoint, tmp_path):
    results, _ = run_hub(
        tmp_path, "hub.repo_file('t/x', 'nope.json')", "hub.optional_repo_file('t/x', 'nope.json')",
        "hub.optional_repo_file('t/x', 'config.json', revision='nope')", "hub.optional_repo_file('t/missing', 'a')",
        "hub.optional_repo_file('t/gated', 'a')", "hub.optional_repo_file('t/badtoken', 'a')",
        "hub.optional_repo_file('t/teapot', 'a')", offline=False, env={"HF_ENDPOINT": hub_endpoint})
    absent, optional, revision, repo, gated, badtoken, teapot = results
    assert absent["error"] == "_AbsentFile" and "nope.json" in absent["message"] and "'main'" in absent["message"]
    assert optional == {"value": None}
    # everything but "no such file" raises, also from optional_repo_file
    assert revision == {"error": "FileNotFoundError", "message": "hub repo 't/x' has no revision 'nope'"}
    assert repo["error"] == "FileNotFoundError" and "no repo 't/missing'" in repo["message"]
    assert gated["error"] == "PermissionError" and "gated" in gated["message"]
    assert badtoken["error"] == "PermissionError" and "token_source" in badtoken["message"]
    assert teapot["error"] == "FileNotFoundError" and "the Hub cannot be reached" in teapot["message"]
