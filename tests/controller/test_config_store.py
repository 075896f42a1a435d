"""Staging, committing and persisting configurations; paths for `config set`/`get`."""

import json

import pytest

from shared.config.loader import ConfigError
from services.controller.config_store import ConfigStore, get_path, parse_path, set_path


def test_commit_is_atomic_and_numbered(tmp_path):
    store = ConfigStore(tmp_path)
    assert store.load() is False
    assert store.commit(store.stage({})) == 1
    assert store.commit(store.stage({"boot": {"default_lun": 3}})) == 2
    doc = json.loads((tmp_path / "controller" / "running.json").read_text())
    assert doc["revision"] == 2 and doc["config"]["boot"]["default_lun"] == 3
    assert (tmp_path / "controller" / "revisions" / "1.yaml").exists()
    assert not list((tmp_path / "controller").glob("*.tmp"))
    again = ConfigStore(tmp_path)
    assert again.load() and again.revision == 2 and again.config.boot.default_lun == 3


def test_rejected_candidate_changes_nothing(tmp_path):
    store = ConfigStore(tmp_path)
    store.commit(store.stage({"boot": {"default_lun": 3}}))
    before = (tmp_path / "controller" / "running.json").read_bytes()
    with pytest.raises(ConfigError, match="boot.default_lun"):
        store.stage({"boot": {"default_lun": -1}})
    assert store.revision == 1 and store.config.boot.default_lun == 3
    assert (tmp_path / "controller" / "running.json").read_bytes() == before


def test_paths():
    assert parse_path("dhcp.scopes[0].range.end") == ["dhcp", "scopes", 0, "range", "end"]
    with pytest.raises(ConfigError):
        parse_path("a..b[")
    data = {"clients": [{"mac": "x"}], "boot": {"default_lun": 0}}
    assert get_path(data, "clients[0].mac") == "x"
    with pytest.raises(ConfigError, match="no such setting"):
        get_path(data, "clients[3]")
    out = set_path(data, "clients[1]", {"mac": "y"})
    assert out["clients"][1] == {"mac": "y"} and len(data["clients"]) == 1  # the original is untouched
    assert set_path(data, "boot.script", "a.ipxe")["boot"]["script"] == "a.ipxe"
