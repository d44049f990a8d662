"""Settings: TOML < environment < flags, validated with clear messages."""

import pytest

from dxserve.cli import main
from dxserve.config import SettingsError, load_settings


def test_precedence(tmp_path):
    config = tmp_path / "dxserve.toml"
    config.write_text('address = "127.0.0.1:7000"\nmax_batch_size = 4\nmax_batch_wait_ms = 2.5\nplugins = ["a.b"]\n')
    env = {"DXSERVE_MAX_BATCH_SIZE": "16", "DXSERVE_DISABLED_PLUGINS": "x,y"}
    settings = load_settings(config, {"address": "127.0.0.1:7001"}, environ=env)
    assert settings.address == "127.0.0.1:7001"  # flag beats file
    assert settings.max_batch_size == 16  # environment beats file
    assert settings.max_batch_wait_ms == 2.5  # file beats default
    assert settings.plugins == ["a.b"] and settings.disabled_plugins == ["x", "y"]


@pytest.mark.parametrize("values, message", [
    ({"address": "localhost"}, "HOST:PORT"),
    ({"max_batch_size": "0"}, "max_batch_size"),
    ({"no_such_setting": 1}, "no_such_setting"),
    ({"tls_cert": "/nonexistent.pem"}, "tls_cert and tls_key go together"),
    ({"log_level": "LOUD"}, "log_level"),
])
def test_invalid_settings_say_what_is_wrong(values, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(None, values, environ={})


def test_unreadable_toml(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("address = ")
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(config, environ={})


def test_serve_exits_2_on_bad_settings(capsys):
    assert main(["serve", "--max-batch-size", "-3"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_example_config_is_valid_and_matches_the_defaults():
    from conftest import ROOT
    from dxserve.config import Settings

    settings = load_settings(ROOT / "server" / "dxserve.example.toml", environ={})
    assert settings == Settings()
