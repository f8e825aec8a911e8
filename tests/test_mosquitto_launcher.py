"""The one Mosquitto launcher (`cascade_fast.apps.mosquitto`): its configuration and binary search.

The broker it starts is exercised by every behaviour test (tests/conftest.py);
these check the pure parts every caller relies on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade_fast.apps import mosquitto as launcher


def test_config_defaults_are_loopback_no_duplicates_nodelay_no_persistence():
    """One set of defaults for the tests, the bench, the benches and the tools."""
    lines = launcher.mosquitto_config(1234).splitlines()
    assert lines[0] == "listener 1234 127.0.0.1"
    for line in ("allow_anonymous true", "allow_duplicate_messages false", "set_tcp_nodelay true", "persistence false"):
        assert line in lines
    assert not any(line.startswith(("acl_file", "persistence_location")) for line in lines)


def test_config_options_and_extra_lines_come_last(tmp_path: Path):
    """Persistence and ACL add their lines; extra_config lines are appended last (later lines win)."""
    conf = launcher.mosquitto_config(
        1234, persistence_dir=tmp_path / "data", acl_file=tmp_path / "acl", extra_config="  allow_anonymous false \n\n"
    )
    lines = conf.splitlines()
    assert "persistence true" in lines and "persistence false" not in lines
    assert f"persistence_location {tmp_path / 'data'}/" in lines
    assert f"acl_file {tmp_path / 'acl'}" in lines
    assert lines[-1] == "allow_anonymous false"


def test_find_mosquitto_prefers_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """$MOSQUITTO wins over PATH when it names an executable."""
    binary = tmp_path / "mosquitto"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("MOSQUITTO", str(binary))
    assert launcher.find_mosquitto() == str(binary)


def test_no_binary_is_none_and_the_launcher_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Nothing on $MOSQUITTO, PATH or the sbin directories: None, and Mosquitto() raises MosquittoNotFound."""
    monkeypatch.delenv("MOSQUITTO", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(launcher, "_CANDIDATES", ())
    assert launcher.find_mosquitto() is None
    with pytest.raises(launcher.MosquittoNotFound, match="apt-get install mosquitto"):
        launcher.Mosquitto()
