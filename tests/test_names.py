"""msamil_core.names: the parse-time name checks, their did-you-mean and the cache of names.

One real ``msamil list-models --json`` subprocess runs for the whole module (the ``warm`` fixture,
on a cache in a temporary folder); the tests that need the names listed again count calls to a
stand-in that returns the same names.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import pytest

from msamil_core import names
from msamil_core.errors import MsamilError


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """The names, listed once for real into a cache under a temporary XDG_CACHE_HOME."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        assert not names.cache_file().exists()
        yield names.known_names()


@pytest.fixture
def lister(monkeypatch, warm):
    """A stand-in for the subprocess that returns the warm names and counts its calls."""
    calls = []

    def listed():
        calls.append(1)
        return json.loads(json.dumps(warm))

    monkeypatch.setattr(names, "_list_in_subprocess", listed)
    return calls


def test_listing_has_every_kind(warm):
    assert {"abmil.base", "msamil.base"} <= set(warm["mil"])
    assert {"uni_v1", "resnet50_trunc"} <= set(warm["encoders"]["presets"])
    assert warm["encoders"]["registered"] == ["msfem"] == names.registered_encoders()
    assert warm["encoders"]["presets"] == names.preset_names()
    assert "resnet18" in warm["encoders"]["timm"] and len(warm["encoders"]["timm"]) > 500


@pytest.mark.parametrize("value, choices, expected", [
    ("resnet50_trunk", ["resnet50", "resnet50d", "resnet50_trunc", "uni_v1"], "resnet50_trunc"),
    ("abmill.base", ["abmil.base", "abmil.plain", "transmil.base"], "abmil.base"),
    ("msamil.bas", ["msamil.base", "abmil.base"], "msamil.base"),
    ("UNI_v1", ["uni_v1", "uni_v2"], "uni_v1"),
    ("banana", ["abmil.base", "msamil.base", "resnet50_trunc"], None),
])
def test_closest(value, choices, expected):
    assert names.closest(value, choices, names.CUTOFF) == expected


def test_did_you_mean_tail():
    assert names.did_you_mean("abmill.base", ["abmil.base"]) == "; did you mean 'abmil.base'? (`msamil list-models` lists them)"
    assert names.did_you_mean("banana", ["abmil.base"]) == " (`msamil list-models` lists them)"


def test_unknown_mil_model_suggests_the_closest(warm):
    with pytest.raises(MsamilError) as err:
        names.check_mil_model("abmill.base", "config: experiment 'x'")
    assert str(err.value) == ("config: experiment 'x' model 'abmill.base' is not a registered MIL model; "
                              "did you mean 'abmil.base'? (`msamil list-models` lists them)")
    with pytest.raises(MsamilError, match="did you mean 'msamil.base'"):
        names.check_mil_model("msamil.bas", "config: experiment 'x'")


def test_unknown_encoder_suggests_the_closest(warm):
    with pytest.raises(MsamilError, match=r"^config: encoder 'r' name 'resnet50_trunk' is not a patch encoder .*"
                                          r"did you mean 'resnet50_trunc'\? \(`msamil list-models`"):
        names.check_encoder_name("resnet50_trunk", "config: encoder 'r'")


@pytest.mark.parametrize("check", [names.check_mil_model, names.check_encoder_name])
def test_an_unrelated_word_gets_no_suggestion_but_the_listing(warm, check):
    with pytest.raises(MsamilError) as err:
        check("banana", "config: x")
    assert "did you mean" not in str(err.value) and "`msamil list-models`" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_hub_reference_is_not_an_encoder_name(warm):
    with pytest.raises(MsamilError, match="hub reference, not an encoder name.*as the encoder's weights"):
        names.check_encoder_name("hf-hub:MahmoodLab/UNI", "config: encoder 'uni'")


@pytest.mark.parametrize("name", ["resnet18", "uni_v1", "msfem", "vit_base_patch16_224.augreg_in21k"])
def test_valid_encoders_pass(warm, name):
    names.check_encoder_name(name, "config: encoder 'e'")


@pytest.mark.parametrize("name", ["abmil.base", "msamil.base", "transmil.base", "abmil.base.uni.none"])
def test_valid_mil_models_pass(warm, name):
    names.check_mil_model(name, "config: experiment 'e'")


def test_presets_and_msfem_need_no_cache(monkeypatch):
    def fail(refresh=False):
        raise AssertionError("the cached names were consulted")

    monkeypatch.setattr(names, "known_names", fail)
    for name in ("uni_v1", "resnet50_trunc", "msfem"):
        names.check_encoder_name(name, "config: encoder 'e'")


def test_the_cache_is_written_and_reused(warm, lister):
    cached = json.loads(names.cache_file().read_text())
    assert cached == {"key": names.cache_key(), "names": warm}
    assert names.known_names() == warm and names.mil_models() == warm["mil"]
    assert names.encoder_names() == warm["encoders"]
    assert lister == []  # read from the file, no subprocess
    names.known_names(refresh=True)
    assert len(lister) == 1


@pytest.mark.parametrize("content", [
    json.dumps({"key": "stale", "names": {"mil": ["old.model"], "encoders": {"presets": [], "registered": [], "timm": []}}}).encode(),
    b'{"key": "',  # cut short
    b"\xff\xfe not json",  # not UTF-8
    json.dumps({"key": "stale"}).encode(),
])
def test_a_stale_or_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, warm, lister, content):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    names.cache_file().parent.mkdir(parents=True)
    names.cache_file().write_bytes(content)
    assert names.known_names() == warm and len(lister) == 1
    assert json.loads(names.cache_file().read_text())["key"] == names.cache_key()
    names.known_names()
    assert len(lister) == 1


def test_the_key_follows_versions_and_sources(tmp_path, monkeypatch):
    for part in names.NAME_SOURCES:
        for path in names.PACKAGE.glob(part):
            dest = tmp_path / path.relative_to(names.PACKAGE)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
    monkeypatch.setattr(names, "PACKAGE", tmp_path)
    key = names.cache_key()
    assert key == names.cache_key()
    with open(tmp_path / "mil" / "abmil.py", "a") as f:
        f.write("\n# edited\n")
    assert names.cache_key() != key
    key = names.cache_key()
    monkeypatch.setattr(names, "_timm_version", lambda: "0.0.1")
    assert names.cache_key() != key
    key = names.cache_key()
    monkeypatch.setattr(names, "__version__", "0.0.0")
    assert names.cache_key() != key


def test_an_unwritable_cache_lists_each_time(tmp_path, monkeypatch, warm, lister):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a file where the cache folder would go: mkdir fails, even as root
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert names.known_names() == warm
    names.check_mil_model("abmil.base", "config: experiment 'x'")
    assert len(lister) == 2
    assert list(tmp_path.iterdir()) == [blocker]


def test_concurrent_writers_leave_one_whole_file(tmp_path, monkeypatch, warm):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    writers = [threading.Thread(target=names._write_cache, args=(names.cache_file(), "k", warm)) for _ in range(8)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert json.loads(names.cache_file().read_text()) == {"key": "k", "names": warm}
    assert [p.name for p in names.cache_dir().iterdir()] == [names.cache_file().name]  # no temporary files left


@pytest.mark.parametrize("script, words", [
    ("echo 'Traceback (most recent call last):' >&2\necho 'ImportError: no timm here' >&2\nexit 3",
     "(?s)exited with status 3.*ImportError: no timm here"),
    ("echo 'not json'", "exited with status 0 but printed no valid JSON.*not json"),
])
def test_a_failed_listing_raises_with_its_stderr(tmp_path, monkeypatch, script, words):
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(MsamilError, match=words):
        names._list_in_subprocess()


def test_a_warm_check_imports_no_torch(warm):
    code = ("import sys, msamil_core.names as n; n.check_mil_model('abmil.base', 'x'); "
            "n.check_encoder_name('resnet18', 'x'); print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
