"""The carrier registry is the only list of carriers: plug-ins join it, and no other code names one."""

from __future__ import annotations

import ast
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import gateway.carriers as registry
from gateway.carriers import CARRIERS, ENTRY_POINT_GROUP
from gateway.carriers.twilio import TwilioCarrier
from gateway.settings import environment, settings_class

PACKAGE = Path(registry.__file__).parent.parent
# Where carriers are allowed to be named: their own modules and their test doubles.
CARRIER_PLACES = ("carriers", "testing")


class AcmeCarrier(TwilioCarrier):
    """A plug-in carrier from another package (here: Twilio's wire format under another name)."""

    name = "acme"
    title = "Acme"


def _entry_point(name: str, target: str) -> EntryPoint:
    return EntryPoint(name=name, value=target, group=ENTRY_POINT_GROUP)


def test_a_package_adds_a_carrier_through_the_entry_point_group(monkeypatch):
    monkeypatch.setattr(registry, "entry_points", lambda group: [_entry_point("acme", f"{__name__}:AcmeCarrier")])
    carriers = registry._registry()
    assert list(carriers)[: len(CARRIERS)] == list(CARRIERS)
    assert carriers["acme"] is AcmeCarrier


def test_a_plug_in_never_replaces_a_built_in_carrier(monkeypatch):
    class Impostor(TwilioCarrier):
        name = next(iter(CARRIERS))

    monkeypatch.setattr(registry, "entry_points", lambda group: [_entry_point("x", "y:z")])
    monkeypatch.setattr(EntryPoint, "load", lambda self: Impostor)
    assert registry._registry()[Impostor.name] is CARRIERS[Impostor.name]


def test_an_entry_point_that_is_not_a_carrier_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "entry_points", lambda group: [_entry_point("bad", "pathlib:Path")])
    with pytest.raises(TypeError, match="is not a gateway.carriers.base.Carrier"):
        registry._registry()


@pytest.mark.parametrize("name", list(CARRIERS))
def test_each_carrier_brings_its_settings_section_and_environment(name):
    carrier = CARRIERS[name]
    assert settings_class().model_fields[name].annotation is carrier.settings_model
    for variable, key in carrier.environment.items():
        assert environment()[variable] == (name, key)
        assert key in carrier.settings_model.model_fields


def _names_in(path: Path) -> list[tuple[int, str]]:
    """Identifiers and string literals of a module, docstrings and comments left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append((node.lineno, node.name))
        elif isinstance(node, ast.alias):
            found.append((getattr(node, "lineno", 0), node.name))
    return found


def test_no_code_outside_the_carriers_places_names_a_carrier():
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in CARRIER_PLACES:
            continue
        for line, text in _names_in(path):
            if any(name in text.lower() for name in CARRIERS):
                offending.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}")
    assert offending == []


@pytest.mark.parametrize("name", list(CARRIERS))
def test_each_carrier_names_its_credentials_so_logs_never_show_them(name):
    carrier = CARRIERS[name]
    fields = set(carrier.settings_model.model_fields)
    assert set(carrier.secret_keys) <= fields
    # Settings named like a credential are declared as one (a public key is not).
    looks_secret = {f for f in fields if any(w in f for w in ("token", "password", "secret", "api_key", "private"))}
    assert looks_secret <= set(carrier.secret_keys), f"{name}: declare {sorted(looks_secret - set(carrier.secret_keys))}"
