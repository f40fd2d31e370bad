"""The opt-out tool (issue 11, item 2): a campaign call's agent gets optOutOfCalls; Ultravox invoking
it (its tool secret, the call id as an automatic parameter) adds the number the gateway called,
never one the model names, to the suppression list, and a later row for that number is suppressed."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from gateway.testing import double
from gateway.testing.callees import Callees

from .conftest import API_KEY, CAMPAIGN_SETTLE, CARRIER_NAMES, TOOL_SECRET, stored_calls

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CARRIER = CARRIER_NAMES[0]
WAIT_SECONDS = 60


def wait_for(predicate, what: str):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_agent_records_an_opt_out_and_later_rows_for_the_number_are_suppressed(
        make_gateway, fake_carriers, fake_ultravox, database_url):
    gateway = make_gateway(CAMPAIGN_SETTLE, database_url=database_url)
    opting, other = "+15557006001", "+15557006002"
    holds = iter([3.0, 0.05, 0.05])
    with Callees(fake_carriers[CARRIER], answer_with=double(CARRIER), hold=lambda: next(holds, 0.05)) as callees:
        body = {"name": "opt-out", "route": "support", "carrier": CARRIER, "calls_per_second": 50,
                "max_concurrency": 1, "rows": [{"to": opting}, {"to": other}, {"to": opting}]}
        response = gateway.client.post("/v1/campaigns", json=body, headers=AUTH)
        assert response.status_code == 201, response.text
        campaign_id = response.json()["id"]
        created = wait_for(lambda: fake_ultravox.created_calls, "the first call's agent")[0]
        # (Ultravox invokes a tool once the agent talks: the gateway has recorded the call by then.)
        wait_for(lambda: any(c.ultravox_call_id == created["callId"] for c in stored_calls(database_url)),
                 "the agent call recorded")
        (request,) = [r for r in fake_ultravox.requests if r.method == "POST" and r.path.endswith("/calls")]
        (tool,) = [t for t in request.body["toolOverrides"]["add"]
                   if t.get("temporaryTool", {}).get("modelToolName") == "optOutOfCalls"]
        definition = tool["temporaryTool"]
        assert definition["automaticParameters"][0]["knownValue"] == "KNOWN_PARAM_CALL_ID"
        assert "+1555" not in str(definition)  # the model never sees (or names) a number
        # Ultravox invokes it as the tool says: its URL, the secret header, the call id and the model's reason.
        header = definition["requirements"]["httpSecurityOptions"]["options"][0]["requirements"]["gatewayToolSecret"]
        assert tool["authTokens"] == {"gatewayToolSecret": TOOL_SECRET}
        path = urlsplit(definition["http"]["baseUrlPattern"]).path
        forged = gateway.client.post(path, json={"callId": created["callId"]},
                                     headers={header["headerApiKey"]["name"]: "wrong"})
        assert forged.status_code == 403
        invoked = gateway.client.post(path, json={"callId": created["callId"], "reason": "please stop calling"},
                                      headers={header["headerApiKey"]["name"]: TOOL_SECRET})
        assert invoked.status_code == 200, invoked.text
        assert invoked.headers["x-ultravox-agent-reaction"] == "speaks"
        done = wait_for(lambda: (lambda v: v if v["status"] == "completed" else None)(
            gateway.client.get(f"/v1/campaigns/{campaign_id}", headers=AUTH).json()), "the campaign to complete")
    assert not callees.errors
    assert done["counts"] == {"completed": 2, "suppressed": 1}, done
    assert dict(callees.dialled) == {opting: 1, other: 1}
    listed = gateway.client.get("/v1/suppressions", headers=AUTH).json()
    (entry,) = [s for s in listed["suppressions"] if s["number"] == opting]
    assert entry["source"] == "opt-out" and entry["reason"] == "please stop calling"
    assert fake_ultravox.schema_errors == []


def test_the_opt_out_tool_refuses_a_call_the_gateway_did_not_place(gateway):
    response = gateway.client.post("/tools/opt-out", json={"callId": "00000000-0000-4000-8000-000000000001"},
                                   headers={"X-Gateway-Tool-Secret": TOOL_SECRET})
    assert response.status_code == 404
    assert gateway.client.get("/v1/suppressions", headers=AUTH).json()["suppressions"] == []
