"""Config precedence: flag > FIREZONE_* environment > TOML file > default."""

from pathlib import Path

import pytest

from firezone import config


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('portal_url = "http://file:1"\n[portal]\nlisten = "0.0.0.0:9000"\nsmtp_port = 2525\n')
    cfg = config.load(f, env={})
    assert cfg.get("portal") == "http://file:1" and cfg.source("portal") == str(f)
    assert cfg.get("portal.listen") == "0.0.0.0:9000"
    assert cfg.get("portal.smtp_port") == 2525
    assert cfg.get("portal.smtp_starttls") is True and cfg.source("portal.smtp_starttls") == "default"
    cfg = config.load(f, env={"FIREZONE_PORTAL_URL": "http://env:2", "FIREZONE_PORTAL_SMTP_STARTTLS": "off"})
    assert cfg.get("portal") == "http://env:2" and cfg.source("portal") == "env FIREZONE_PORTAL_URL"
    assert cfg.get("portal.smtp_starttls") is False
    cfg.set_flag("portal", "http://flag:3")
    assert cfg.get("portal") == "http://flag:3" and cfg.source("portal") == "flag"
    cfg.set_flag("portal.listen", None)  # an absent flag changes nothing
    assert cfg.get("portal.listen") == "0.0.0.0:9000"


def test_bad_inputs_name_the_place(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("portal = [unclosed\n")
    with pytest.raises(config.ConfigError, match="invalid TOML"):
        config.load(f, env={})
    f.write_text("[portal]\nsmtp_port = 'many'\n")
    with pytest.raises(config.ConfigError, match="smtp_port"):
        config.load(f, env={})
    with pytest.raises(config.ConfigError, match="FIREZONE_PORTAL_SMTP_PORT"):
        config.load(tmp_path / "none.toml" if False else None, env={"FIREZONE_PORTAL_SMTP_PORT": "x"})
    with pytest.raises(config.ConfigError, match="no such config file"):
        config.load(tmp_path / "missing.toml", env={})


def test_unknown_keys_warn(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("typo_key = 1\n")
    warnings: list[str] = []
    config.load(f, env={}, warn=warnings.append)
    assert warnings and "typo_key" in warnings[0]


def test_secrets_are_masked() -> None:
    cfg = config.Config()
    cfg.set_flag("portal.smtp_password", "hunter2")
    shown = {k: v for k, v, _ in cfg.effective()}
    assert shown["portal.smtp_password"] == "********"
