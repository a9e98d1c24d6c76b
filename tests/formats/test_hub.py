"""Hub model ids (``org/name``): resolved from the local Hugging Face cache, laid out here as
huggingface_hub lays it out; downloaded only when not cached and not offline; otherwise one line
that says how to get the model."""

from __future__ import annotations

import pytest
from tiny_models import make_tiny

import quantkit.formats.float_models as fm
from quantkit import QuantkitError

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(cache, repo_id="org/tiny-llama"):
    """``cache/models--org--name/{refs/main, snapshots/<hash>/...}``, as ``snapshot_download`` leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    make_tiny("llama").save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so that no local folder ./org/... shadows the hub id
    return monkeypatch


def test_hub_id_resolves_from_the_cache(offline, tmp_path):
    snapshot = _fake_cache(tmp_path / "hub-cache")
    offline.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    path = fm.resolve("org/tiny-llama")
    assert path.resolve() == snapshot.resolve()
    fm.check_causal_lm(path)


def test_hf_home_is_honoured(offline, tmp_path):
    snapshot = _fake_cache(tmp_path / "home" / "hub")
    offline.setenv("HF_HOME", str(tmp_path / "home"))
    assert fm.resolve("org/tiny-llama").resolve() == snapshot.resolve()


def test_not_cached_and_offline_is_one_line_saying_how(offline, tmp_path):
    _fake_cache(tmp_path / "hub-cache")
    offline.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(QuantkitError) as e:
        fm.resolve("org/missing")
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg
    assert "hf download org/missing" in msg and "huggingface-cli download org/missing" in msg
    assert "local model folder" in msg


def test_local_folder_wins_and_paths_are_not_hub_ids(offline, tmp_path):
    local = tmp_path / "org" / "tiny-llama"
    make_tiny("llama").save_pretrained(local)
    assert fm.resolve("org/tiny-llama") == fm.Path("org/tiny-llama")
    for name in ("./org/nope", "/abs/nope", "a/b/c", "x/..", "org--x/y"):
        assert not fm.is_hub_id(name)
        with pytest.raises(QuantkitError, match="not found"):
            fm.resolve(name)
    assert fm.is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and fm.is_hub_id("Qwen/Qwen2.5-0.5B")


def test_download_when_online_fetches_only_weights_config_and_tokenizer(offline, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline.delenv("HF_HUB_OFFLINE")
    offline.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    offline.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append(kw)
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(_fake_cache(tmp_path / "hub-cache", repo_id))

    offline.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = fm.resolve("org/tiny-llama")
    assert (path / "config.json").is_file()
    assert [c.get("local_files_only", False) for c in calls] == [True, False]
    assert calls[1]["allow_patterns"] == fm.HUB_PATTERNS and "*.safetensors" in fm.HUB_PATTERNS
    assert all(str(c["cache_dir"]) == str(tmp_path / "hub-cache") for c in calls)
    assert not any("trust_remote_code" in c for c in calls)

    def failing(repo_id, **kw):
        raise (LocalEntryNotFoundError if kw.get("local_files_only") else OSError)("Name or service not known\nmore")

    offline.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(QuantkitError) as e:
        fm.resolve("org/other")
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg and "huggingface-cli download org/other" in msg
