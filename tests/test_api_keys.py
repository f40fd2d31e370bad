"""API keys with permissions and a scope, end to end: the real gateway, its store on SQLite and
PostgreSQL, fake carriers; every /v1 operation walked with keys that lack its permission."""

from __future__ import annotations

import re
import time

import pytest
from starlette.routing import Route

from gateway.access import OPERATIONS
from gateway.cli import main as cli_main
from gateway.settings import PERMISSIONS, ConfigError, load_settings
from gateway.testing import EventReceiver, double

from .conftest import API_KEY, BASE_CONFIG, INLINE_NUMBER, OTHER_API_KEY, SUPPORT_NUMBER
from .test_events import webhooks_config

CALLEE = "+15557654321"
SUPPORT_DESK = "support-desk-key-0123456789"  # calls of the support route, every permission
TWILIO_READER = "twilio-reader-key-0123456789"  # calls through Twilio, read only
TELNYX_DIALER = "telnyx-dialer-key-0123456789"  # dials and reads, through Telnyx only
OWN_DIALER = "own-dialer-key-0123456789abc"  # only the calls it placed (its campaigns' too)
SCOPED_KEYS = f"""
[[api_keys]]
name = "support-desk"
key = "{SUPPORT_DESK}"
routes = ["support"]

[[api_keys]]
name = "twilio-reader"
key = "{TWILIO_READER}"
carriers = ["twilio"]
permissions = ["read"]

[[api_keys]]
name = "telnyx-dialer"
key = "{TELNYX_DIALER}"
carriers = ["telnyx"]
permissions = ["dial", "read"]

[[api_keys]]
name = "own-dialer"
key = "{OWN_DIALER}"
own_calls_only = true
"""
WAIT_SECONDS = 30


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call_in(gateway, carrier: str, to: str) -> str:
    """An inbound call to `to` on `carrier`; its gateway id."""
    form = double(carrier).inbound_form(to=to)
    response = gateway.post(carrier, form)
    assert response.status_code == 200, response.text
    carrier_call_id = form[double(carrier).call_id_param]
    (record,) = [r for r in gateway.records() if r.carrier_call_id == carrier_call_id]
    return record.id


def dial(gateway, key: str, **body):
    return gateway.client.post("/v1/calls", json={"to": CALLEE, "route": "support", **body}, headers=auth(key))


def listed(gateway, key: str, path: str = "/v1/calls", field: str = "calls") -> set[str]:
    response = gateway.client.get(path, headers=auth(key))
    assert response.status_code == 200, response.text
    return {entry["id"] for entry in response.json()[field]}


def wait_for(predicate, what: str):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(0.05)
    raise AssertionError(f"never {what}")


@pytest.fixture
def receiver():
    with EventReceiver() as receiver:
        yield receiver


def test_a_key_sees_and_acts_on_only_the_calls_campaigns_and_events_of_its_scope(
        make_gateway, fake_carriers, receiver, database_url):
    gateway = make_gateway(SCOPED_KEYS + webhooks_config(("crm", receiver)), database_url=database_url)
    support_twilio = call_in(gateway, "twilio", SUPPORT_NUMBER)
    inline_telnyx = call_in(gateway, "telnyx", INLINE_NUMBER)
    support_plivo = call_in(gateway, "plivo", SUPPORT_NUMBER)
    placed = dial(gateway, OWN_DIALER, route="inline", carrier="telnyx")
    assert placed.status_code == 201, placed.text
    own_dial = placed.json()["id"]
    # A campaign's calls are placed under no key of the user's: they are the creating key's own.
    created = gateway.client.post("/v1/campaigns", headers=auth(OWN_DIALER), json={
        "name": "own", "route": "inline", "carrier": "telnyx", "rows": [{"to": "+15557650001"}]})
    assert created.status_code == 201, created.text
    own_campaign = created.json()["id"]
    row = wait_for(lambda: (rows := gateway.client.get(f"/v1/campaigns/{own_campaign}/rows", headers=auth(OWN_DIALER))
                            .json()["rows"]) and rows[0]["call_id"] and rows[0], "dialled the campaign's row")
    campaign_call = row["call_id"]
    others = gateway.client.post("/v1/campaigns", headers=auth(API_KEY), json={
        "name": "others", "route": "inline", "carrier": "telnyx", "rows": [{"to": "+15557650002"}]})
    assert others.status_code == 201, others.text
    other_campaign = others.json()["id"]
    everything = {support_twilio, inline_telnyx, support_plivo, own_dial, campaign_call}
    other_campaign_call = wait_for(lambda: listed(gateway, API_KEY) - everything, "dialled the other campaign")
    everything |= other_campaign_call

    sees = {
        API_KEY: everything,  # a plain key: every call
        SUPPORT_DESK: {support_twilio, support_plivo},
        TWILIO_READER: {support_twilio},
        TELNYX_DIALER: {inline_telnyx, own_dial, campaign_call, *other_campaign_call},
        OWN_DIALER: {own_dial, campaign_call},
    }
    for key, visible in sees.items():
        assert listed(gateway, key) == visible, key
        for call_id in everything:
            response = gateway.client.get(f"/v1/calls/{call_id}", headers=auth(key))
            # Outside the scope is indistinguishable from no such call: existence does not leak.
            expected = (200, None) if call_id in visible else (404, {"detail": "no such call"})
            assert (response.status_code, None if response.is_success else response.json()) == expected, (key, call_id)
    # The list's own filters narrow the scope, never widen it.
    narrowed = gateway.client.get("/v1/calls", params={"carrier": "plivo"}, headers=auth(TWILIO_READER))
    assert narrowed.json()["calls"] == []

    # Acting on a call outside the scope: 404 as well, and nothing happens to it.
    for action, body in (("hangup", None), ("messages", {"text": "hello"}),
                         ("transfer", {"operator": "sales", "reason": "asks for a person"})):
        response = gateway.client.post(f"/v1/calls/{inline_telnyx}/{action}", json=body, headers=auth(SUPPORT_DESK))
        assert response.status_code == 404 and response.json() == {"detail": "no such call"}, (action, response.text)
    assert gateway.client.get(f"/v1/calls/{inline_telnyx}/recording", headers=auth(SUPPORT_DESK)).status_code == 404
    assert gateway.client.get(f"/v1/calls/{inline_telnyx}", headers=auth(API_KEY)).json()["status"] != "canceled"
    # In scope, the same key acts: its call is hung up.
    hung_up = gateway.client.post(f"/v1/calls/{support_twilio}/hangup", headers=auth(SUPPORT_DESK))
    assert hung_up.status_code in (200, 502), hung_up.text

    # Events: only those of calls in scope, listed, read or redelivered.
    wait_for(lambda: {e["call_id"] for e in gateway.client.get("/v1/events", headers=auth(API_KEY)).json()["events"]}
             >= {support_twilio, inline_telnyx}, "recorded the calls' events")
    all_events = gateway.client.get("/v1/events", params={"limit": 200}, headers=auth(API_KEY)).json()["events"]
    desk_events = gateway.client.get("/v1/events", params={"limit": 200}, headers=auth(SUPPORT_DESK)).json()["events"]
    assert desk_events and {e["call_id"] for e in desk_events} <= sees[SUPPORT_DESK]
    assert {e["id"] for e in desk_events} == {e["id"] for e in all_events if e["call_id"] in sees[SUPPORT_DESK]}
    outside = next(e for e in all_events if e["call_id"] == inline_telnyx)
    assert gateway.client.get(f"/v1/events/{outside['id']}", headers=auth(SUPPORT_DESK)).status_code == 404
    redelivered = gateway.client.post(f"/v1/events/{outside['id']}/redeliver", headers=auth(SUPPORT_DESK))
    assert redelivered.status_code == 404 and redelivered.json() == {"detail": "no such event"}
    inside = desk_events[0]
    assert gateway.client.get(f"/v1/events/{inside['id']}", headers=auth(SUPPORT_DESK)).status_code == 200
    assert gateway.client.post(f"/v1/events/{inside['id']}/redeliver", headers=auth(SUPPORT_DESK)).status_code == 202

    # Campaigns: a key sees (and steers) those of its scope; the others are 404.
    assert listed(gateway, OWN_DIALER, "/v1/campaigns", "campaigns") == {own_campaign}
    assert gateway.client.get("/v1/campaigns", headers=auth(TELNYX_DIALER)).status_code == 403  # no such permission
    assert listed(gateway, SUPPORT_DESK, "/v1/campaigns", "campaigns") == set()  # both are on route inline
    assert listed(gateway, API_KEY, "/v1/campaigns", "campaigns") == {own_campaign, other_campaign}
    for path in ("", "/rows"):
        response = gateway.client.get(f"/v1/campaigns/{other_campaign}{path}", headers=auth(OWN_DIALER))
        assert response.status_code == 404 and response.json() == {"detail": "no such campaign"}
    for action in ("pause", "resume", "cancel"):
        assert gateway.client.post(f"/v1/campaigns/{other_campaign}/{action}", headers=auth(OWN_DIALER)).status_code == 404
    assert gateway.client.get(f"/v1/campaigns/{other_campaign}", headers=auth(API_KEY)).json()["status"] != "canceled"
    assert gateway.client.post(f"/v1/campaigns/{own_campaign}/cancel", headers=auth(OWN_DIALER)).status_code in (200, 409)


def test_dialling_outside_the_keys_scope_is_refused_with_403_and_places_nothing(make_gateway, fake_carriers):
    gateway = make_gateway(SCOPED_KEYS)
    refusals = [
        (SUPPORT_DESK, {"route": "inline"}, "may not dial on route 'inline'; its routes: support"),
        (SUPPORT_DESK, {"route": None, "agent_id": "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"},
         "dials only on its routes (support): name one as route"),
        (TELNYX_DIALER, {"carrier": "twilio"}, "may not dial through twilio; its carriers: telnyx"),
        (TELNYX_DIALER, {}, "may not dial through twilio"),  # no carrier named: the default one
    ]
    for key, body, words in refusals:
        response = dial(gateway, key, **body)
        assert response.status_code == 403 and words in response.json()["detail"], (body, response.text)
    campaign = gateway.client.post("/v1/campaigns", headers=auth(SUPPORT_DESK), json={
        "name": "x", "route": "inline", "rows": [{"to": "+15557650001"}]})
    assert campaign.status_code == 403 and "may not dial on route 'inline'" in campaign.json()["detail"]
    assert gateway.records() == [] and all(not fake.calls for fake in fake_carriers.values())
    # Within the scope the same keys dial.
    assert dial(gateway, SUPPORT_DESK).status_code == 201
    assert dial(gateway, TELNYX_DIALER, carrier="telnyx").status_code == 201
    # A key without the permission: 403 that names it, before the body is read.
    response = gateway.client.post("/v1/calls", content=b"not json", headers=auth(TWILIO_READER))
    assert response.status_code == 403
    assert response.json()["detail"] == ("API key twilio-reader lacks the dial permission, needed to place calls "
                                         "(POST /v1/calls); it has: read")


# --- every /v1 operation behind its permission ---------------------------------------------------------

def all_but(permission: str) -> str:
    return f"lacks-{permission}-key-0123456789"


LACKING_KEYS = "".join(
    f'\n[[api_keys]]\nname = "no-{p}"\nkey = "{all_but(p)}"\npermissions = {[q for q in PERMISSIONS if q != p]!r}\n'
    .replace("'", '"') for p in PERMISSIONS)


def test_every_v1_operation_needs_its_permission_and_no_route_is_left_out(make_gateway):
    gateway = make_gateway(LACKING_KEYS)
    document = gateway.client.get("/v1/openapi.json").json()  # public: no key
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    served = {(method, route.path) for route in gateway.server.app.routes if isinstance(route, Route)
              and route.path.startswith("/v1/") for method in route.methods or () if method != "HEAD"}
    # A /v1 route must be documented and have a permission: app.py builds them from OPERATIONS.
    assert documented == served == set(OPERATIONS)
    walked = 0
    for (method, path), permission in OPERATIONS.items():
        url = re.sub(r"\{[^}]+\}", "x", path)
        if permission is None:
            assert gateway.client.request(method, url).status_code == 200
            continue
        operation = document["paths"][path][method.lower()]
        assert operation["x-permission"] == permission
        assert f"`{permission}` permission" in operation["responses"]["403"]["description"]
        assert "401" in operation["responses"]
        unauthenticated = gateway.client.request(method, url, json={})
        assert unauthenticated.status_code == 401 and unauthenticated.headers["www-authenticate"] == "Bearer", (method, path)
        lacking = gateway.client.request(method, url, json={}, headers=auth(all_but(permission)))
        assert lacking.status_code == 403, (method, path, lacking.text)
        assert lacking.json()["detail"].startswith(f"API key no-{permission} lacks the {permission} permission")
        # Every other key gets past the check (to whatever the operation answers to "x").
        for other in PERMISSIONS:
            if other != permission:
                assert gateway.client.request(method, url, json={}, headers=auth(all_but(other))).status_code != 403
        walked += 1
    assert walked == len(documented) - 1


# --- the configuration ---------------------------------------------------------------------------------

def test_plain_keys_keep_full_access_and_the_environment_keeps_the_files_tables(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(BASE_CONFIG.replace("[gateway]\n", f'[gateway]\napi_keys = ["{OTHER_API_KEY}"]\n')
                    + '[[api_keys]]\nname = "crm"\nkey_env = "CRM_API_KEY"\nroutes = ["support"]\npermissions = ["read"]\n')
    environ = {"CRM_API_KEY": "crm-key-from-a-secret-0123"}
    settings = load_settings(path, environ)
    assert [(k.key, k.name, k.permissions, k.routes) for k in settings.api_keys] == [
        (OTHER_API_KEY, settings.api_keys[0].name, list(PERMISSIONS), []),
        ("crm-key-from-a-secret-0123", "crm", ["read"], ["support"]),
    ]
    assert "crm-key-from-a-secret-0123" in settings.secrets()
    # GATEWAY_API_KEYS takes the place of the file's plain keys, as before; its tables stay.
    settings = load_settings(path, {**environ, "GATEWAY_API_KEYS": f"{API_KEY}, {SUPPORT_DESK}"})
    assert [k.key for k in settings.api_keys] == [API_KEY, SUPPORT_DESK, "crm-key-from-a-secret-0123"]
    assert not settings.api_keys[0].scoped and settings.api_keys[2].scoped


def test_check_names_every_scope_problem_in_one_pass_and_never_a_key(tmp_path, capsys):
    path = tmp_path / "gateway.toml"
    path.write_text(BASE_CONFIG + f"""
[[api_keys]]
name = "crm"
key = "{SUPPORT_DESK}"
routes = ["suport", "sales-line"]
carriers = ["twilo"]
permissions = ["read", "dail"]

[[api_keys]]
name = "crm"
key = "short-secret"

[[api_keys]]
key_env = "REPORTS_API_KEY"

[[api_keys]]
name = "again"
key = "{SUPPORT_DESK}"
""")
    with pytest.raises(ConfigError) as error:
        load_settings(path, {})
    problems = error.value.problems
    expected = [
        "api_keys[0] (name crm).permissions[1]: must be one of",
        "api_keys[0] (name crm).carriers: names carriers this gateway does not speak: twilo (did you mean 'twilio'?)",
        "api_keys[1] (name crm).key: API keys must be at least 16 characters",
        "API key api_keys[2] (key_env REPORTS_API_KEY): key_env names 'REPORTS_API_KEY', which is not set",
        "API key crm is scoped to routes that are not configured: suport (did you mean 'support'?), sales-line",
        "two API keys are named crm; give each its own name",
        "API key again is the same key as one before it",
    ]
    for words in expected:
        assert any(problem.startswith(words) for problem in problems), (words, problems)
    assert len(problems) == len(expected)
    assert not any(secret in str(problems) for secret in (SUPPORT_DESK, "short-secret"))
    assert cli_main(["check", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert "suport" in captured.err and SUPPORT_DESK not in captured.err + captured.out

    path.write_text(BASE_CONFIG + SCOPED_KEYS)
    assert cli_main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "API key support-desk: every permission; routes support" in out
    assert "API key twilio-reader: read; carriers twilio" in out
    assert "API key own-dialer: every permission; its own calls only" in out
    assert not any(key in out for key in (SUPPORT_DESK, TWILIO_READER, TELNYX_DIALER, OWN_DIALER))
