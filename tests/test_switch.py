"""The CASCADE_CONNECTOR switch: which class `MqttConnector` is, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cascade_fast
from cascade.connectors import mqtt
from cascade.connectors.mqtt import PyMqttConnector, connector_class_from_env

needs_extensions = pytest.mark.skipif(
    not cascade_fast.EXTENSIONS_LOADED, reason="compiled core not loaded (pure leg); see test_fallback.py"
)


def _import_in_child(value: str | None) -> subprocess.CompletedProcess:
    """Import the switch in a fresh interpreter with CASCADE_CONNECTOR=value (None: unset)."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    env.pop("CASCADE_CONNECTOR", None)
    if value is not None:
        env["CASCADE_CONNECTOR"] = value
    code = "from cascade.connectors.mqtt import MqttConnector; print(MqttConnector.__module__, MqttConnector.__name__)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("value", [None, "", "python", " Python "])
def test_unset_or_python_selects_the_reference_connector(value):
    """Unset, empty or 'python' (any case, spaces) gives PyMqttConnector at import."""
    result = _import_in_child(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cascade.connectors.mqtt.reference", "PyMqttConnector"]


@needs_extensions
def test_fast_selects_the_compiled_connector_at_import():
    """CASCADE_CONNECTOR=fast makes MqttConnector the FastMqttConnector."""
    result = _import_in_child("fast")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cascade_fast.connector", "FastMqttConnector"]


def test_unknown_value_fails_at_import_listing_valid_values():
    """Any other value is a ValueError that names the value and lists the valid ones."""
    result = _import_in_child("turbo")
    assert result.returncode != 0
    assert "ValueError" in result.stderr
    assert "'turbo'" in result.stderr and "'python'" in result.stderr and "'fast'" in result.stderr


def test_unknown_value_in_process_raises_value_error():
    """connector_class_from_env raises the same ValueError in process."""
    with pytest.raises(ValueError, match=r"valid values are 'python', 'fast'"):
        connector_class_from_env("pyhton")


def test_fast_without_extension_raises_import_error_with_the_fix():
    """fast with the compiled core disabled fails with an ImportError saying how to install a wheel."""
    env = dict(os.environ, PYTHONSAFEPATH="1", CASCADE_CONNECTOR="fast", CASCADE_FAST_NO_EXTENSIONS="1")
    code = "import cascade.connectors.mqtt"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "pip install --only-binary=:all: cascade-fast" in result.stderr
    assert "CASCADE_CONNECTOR=python" in result.stderr


def test_create_connector_applies_the_rule_at_call_time(monkeypatch):
    """cascade_fast.create_connector reads CASCADE_CONNECTOR when called, not at import."""
    monkeypatch.setenv("CASCADE_CONNECTOR", "python")
    connector = cascade_fast.create_connector(hostname="127.0.0.1", port=1, source_id="switch-test")
    assert type(connector) is PyMqttConnector
    monkeypatch.setenv("CASCADE_CONNECTOR", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        cascade_fast.create_connector(hostname="127.0.0.1", port=1)


@needs_extensions
def test_create_connector_fast(monkeypatch):
    """create_connector with CASCADE_CONNECTOR=fast builds a FastMqttConnector."""
    monkeypatch.setenv("CASCADE_CONNECTOR", "fast")
    connector = cascade_fast.create_connector(hostname="127.0.0.1", port=1, source_id="switch-test")
    assert type(connector).__name__ == "FastMqttConnector"


def test_module_exports_the_selected_class():
    """MqttConnector is the class the environment of this run selects."""
    assert mqtt.VALID_CONNECTORS == ("python", "fast")
    assert mqtt.MqttConnector is connector_class_from_env()
