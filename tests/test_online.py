"""`gateway check --online` against the loopback fakes: good credentials, bad ones, nobody answering."""

from __future__ import annotations

import pytest

from gateway.carriers import CARRIERS
from gateway.cli import main as cli_main

from .conftest import BASE_CONFIG, UNREACHABLE, gateway_environ


@pytest.fixture
def check(tmp_path, monkeypatch, fake_ultravox, fake_carriers):
    """Run `gateway check --online` with the test environment (the fakes' URLs and credentials)
    changed by `changes`; returns (exit code, printed lines by service)."""
    config = tmp_path / "gateway.toml"
    config.write_text(BASE_CONFIG)

    def run(capsys, **changes: str | None) -> tuple[int, dict[str, str]]:
        environ = gateway_environ(fake_ultravox, f"sqlite:///{tmp_path / 'g.db'}", fake_carriers)
        for name, value in {**environ, **changes}.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        code = cli_main(["check", "--online", "--config", str(config)])
        out = capsys.readouterr().out
        online = out.split("Online", 1)[1].splitlines()[1:]
        return code, {line.split()[1]: line for line in online}

    return run


def test_good_credentials_reach_every_service(check, capsys, fake_ultravox, fake_carriers):
    code, lines = check(capsys)
    assert code == 0, lines
    assert set(lines) == {"Ultravox", *(carrier.title for carrier in CARRIERS.values())}
    assert all(line.split()[0] == "ok" for line in lines.values()), lines
    assert "account 'Fake Ultravox account'" in lines["Ultravox"]
    assert [r.path for r in fake_ultravox.requests] == ["/api/accounts/me"]
    for name, fake in fake_carriers.items():
        (request,) = fake.requests  # one cheap authenticated GET, nothing placed
        assert request.method == "GET" and request.path == CARRIERS[name](fake_settings(name)).account_path()
        assert not fake.calls


def fake_settings(name: str):
    from gateway.settings import load_settings
    from gateway.testing import double

    return load_settings(None, double(name).environ("http://x"))


def test_bad_credentials_are_named(check, capsys):
    wrong = {"ULTRAVOX_API_KEY": "not-the-key"}
    for carrier in CARRIERS.values():
        (variable,) = carrier(fake_settings(carrier.name)).variables(carrier.rest_keys[-1:])
        wrong[variable] = "wrong-" + variable.lower()
    code, lines = check(capsys, **wrong)
    assert code == 1
    assert lines["Ultravox"].startswith("  FAILED") and "refused the API key (401)" in lines["Ultravox"]
    assert "ULTRAVOX_API_KEY" in lines["Ultravox"]
    for carrier in CARRIERS.values():
        line = lines[carrier.title]
        assert line.startswith("  FAILED") and "refused the credentials (401)" in line, line
        for variable in carrier(fake_settings(carrier.name)).variables(carrier.rest_keys):
            assert variable in line


def test_unreachable_services_and_unconfigured_carriers(check, capsys):
    first, second, *rest = CARRIERS.values()
    unreachable = {"ULTRAVOX_BASE_URL": UNREACHABLE}
    for carrier in (first, *rest):
        (variable,) = [v for v, key in carrier.environment.items() if key == "api_base_url"]
        unreachable[variable] = UNREACHABLE
    # The second carrier not configured at all; the last one with half its credentials.
    settings = fake_settings(second.name)
    unreachable.update({variable: None for variable in second(settings).variables(second.rest_keys)})
    last = rest[-1]
    unreachable[last(fake_settings(last.name)).variables(last.rest_keys[:1])[0]] = None
    code, lines = check(capsys, **unreachable)
    assert code == 1
    assert "cannot reach http://127.0.0.1:9 (connection refused)" in lines["Ultravox"]
    assert "ULTRAVOX_BASE_URL" in lines["Ultravox"]
    assert "cannot reach http://127.0.0.1:9" in lines[first.title]
    assert lines[second.title].startswith("  skipped") and "not configured" in lines[second.title]
    assert lines[last.title].startswith("  FAILED") and "incomplete" in lines[last.title]
