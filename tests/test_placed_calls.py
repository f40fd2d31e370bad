"""Each carrier's call list as the outbound sweep reads it after a crash (`find_placed_calls`): the
request it sends and its parse of a recorded answer, in the shape of the carrier's documented
examples (Twilio's and Telnyx's API references, Plivo's SDK fixtures, Exotel's Call Details
reference). A call is the dead process's dial only if it went between the same numbers within the
dial's window; the end-to-end tests of the sweep are in test_outbound.py and test_campaign_crash.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from urllib.parse import parse_qs

import httpx
import pytest

from gateway import statuses
from gateway.carriers import CARRIERS
from gateway.carriers.base import Carrier, PlacedCall, PlacedCallQuery
from gateway.http import RemoteError
from gateway.settings import load_settings
from gateway.testing import double

BASE = "http://carrier.test"
CALLEE = "+15557654321"
OURS = "+15550009999"
DIALLED_AT = dt.datetime(2026, 3, 2, 10, 0, 0, 250000, tzinfo=dt.timezone.utc)
QUERY = PlacedCallQuery(CALLEE, OURS, DIALLED_AT, DIALLED_AT + dt.timedelta(seconds=70))


def carrier_named(name: str, tmp_path) -> Carrier:
    config = tmp_path / "gateway.toml"
    config.write_text(double(name).config_toml())
    return CARRIERS[name](load_settings(config, double(name).environ(BASE)))


def find(carrier: Carrier, answer) -> tuple[list[PlacedCall], list[httpx.Request]]:
    """find_placed_calls against `answer(request) -> httpx.Response`; the calls and the requests sent."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answer(request)

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await carrier.find_placed_calls(http, QUERY, deadline=time.monotonic() + 5)

    return asyncio.run(run()), sent


def query_of(request: httpx.Request) -> dict[str, str]:
    return {name: values[-1] for name, values in parse_qs(request.url.query.decode(), keep_blank_values=True).items()}


def twiml_call(sid: str, status: str, created: str, **fields: str) -> dict:
    return {"account_sid": "AC" + "0" * 32, "sid": sid, "status": status, "date_created": created,
            "date_updated": created, "direction": "outbound-api", "from": OURS, "to": CALLEE, **fields}


@pytest.mark.parametrize("name, path", [
    ("twilio", f"/2010-04-01/Accounts/{double('twilio').account_sid}/Calls.json"),
    ("telnyx", f"/v2/texml/Accounts/{double('telnyx').account_sid}/Calls"),
])
def test_twilio_and_telnyx_read_the_calls_between_the_numbers_created_in_the_dials_window(name, path, tmp_path):
    ours = "CA" + "1" * 32 if name == "twilio" else "v3:KBnLO0ZK3DhKM5s7bE9VluaSmKsOchKht_fUYvxcp8ysbmzCCtpkmA"
    page = {"calls": [
        twiml_call("CA" + "2" * 32, "queued", "Mon, 02 Mar 2026 10:05:00 +0000"),  # created after the window
        twiml_call(ours, "ringing", "Mon, 02 Mar 2026 10:00:00 +0000"),  # the dial's second: counts
        twiml_call("CA" + "3" * 32, "completed", "Mon, 02 Mar 2026 09:59:59 +0000"),  # before the record
    ], "page": 0, "page_size": 50, "uri": path}
    carrier = carrier_named(name, tmp_path)
    found, sent = find(carrier, lambda request: httpx.Response(200, json=page))
    assert found == [PlacedCall(ours, statuses.RINGING)]
    (request,) = sent
    assert request.method == "GET" and request.url.path == path
    assert query_of(request) == {"To": CALLEE, "From": OURS, "PageSize": "50"}


def test_a_call_list_answer_that_is_no_list_is_a_remote_error(tmp_path):
    carrier = carrier_named("twilio", tmp_path)
    with pytest.raises(RemoteError):
        find(carrier, lambda request: httpx.Response(200, text="<html>maintenance</html>"))


QUEUED = "85b1d45d-bc12-47f5-89c7-ae4a2c5d5713"
LEFT_THE_QUEUE = "9834029e-58b6-11e1-b8b7-a5bd0e4e126f"
LIVE = "d0a87a1a-b0e9-4ab2-ac07-c22ee87cd04a"
ENDED = "eba53b9e-8fbd-45c1-9444-696d2172fbc8"
EARLIER = "57a1b60a-5c0b-11e7-9082-ef888d0400e9"


def plivo_answer(request: httpx.Request) -> httpx.Response:
    """Plivo's three lists and the calls they name, as its SDK's fixtures write them."""
    account = "/v1/Account/MA" + "0" * 18 + "/Call/"
    query = query_of(request)
    if request.url.path == account and query.get("status") == "queued":
        return httpx.Response(200, json={"api_id": "b251cbd6", "calls": [QUEUED, LEFT_THE_QUEUE]})
    if request.url.path == account and query.get("status") == "live":
        return httpx.Response(200, json={"api_id": "b251cbd6", "calls": [LIVE]})
    if request.url.path == account:
        record = {"answer_time": None, "bill_duration": 0, "billed_duration": 0, "call_direction": "outbound",
                  "call_duration": 0, "end_time": "2026-03-02 15:30:40+05:30", "from_number": "+15550009999",
                  "hangup_cause_code": 3010, "hangup_cause_name": "Busy Line", "hangup_source": "Callee",
                  "parent_call_uuid": None, "to_number": "15557654321", "total_amount": "0.00000"}
        return httpx.Response(200, json={"api_id": "8299d094", "meta": {
            "limit": 20, "next": None, "offset": 0, "previous": None, "total_count": 3}, "objects": [
            {**record, "call_uuid": ENDED, "initiation_time": "2026-03-02 15:30:30+05:30"},  # 10:00:30 UTC
            {**record, "call_uuid": EARLIER, "initiation_time": "2026-03-02 15:29:00+05:30"},  # before the record
            {**record, "call_uuid": "0e8f8b1c-1111-4c2d-9d5e-3a0b7c6d5e4f",  # a longer number the prefix filter let in
             "to_number": "155576543210", "initiation_time": "2026-03-02 15:30:30+05:30"},
        ]})
    if request.url.path == f"{account}{QUEUED}/" and query == {"status": "queued"}:
        return httpx.Response(200, json={"api_id": "x", "call_status": "queued", "direction": "outbound",
                                         "from": "15550009999", "request_uuid": QUEUED, "to": "15557654321",
                                         "caller_name": ""})
    if request.url.path == f"{account}{LIVE}/" and query == {"status": "live"}:
        return httpx.Response(200, json={"api_id": "18f3bbb0", "call_status": "in-progress", "call_uuid": LIVE,
                                         "caller_name": "", "direction": "outbound", "from": "+15550009999",
                                         "request_uuid": LIVE, "session_start": "2026-03-02 10:00:02.050872",
                                         "to": "15557654321"})
    return httpx.Response(404, json={"api_id": "x", "error": "not found"})


def test_plivo_reads_its_queued_live_and_ended_calls_in_turn(tmp_path):
    carrier = carrier_named("plivo", tmp_path)
    found, sent = find(carrier, plivo_answer)
    assert found == [
        PlacedCall(None, statuses.QUEUED),  # named by its first callback
        PlacedCall(LIVE, statuses.ANSWERED),
        PlacedCall(ENDED, statuses.BUSY),
    ]
    lists = [query_of(request) for request in sent if request.url.path.endswith("/Call/")]
    assert lists == [
        {"status": "queued", "limit": "20", "offset": "0"},
        {"status": "live", "call_direction": "outbound", "from_number": "15550009999", "to_number": "15557654321",
         "limit": "20", "offset": "0"},
        {"call_direction": "outbound", "from_number": "15550009999", "to_number": "15557654321",
         "end_time__gte": "2026-03-02 10:00:00", "limit": "20", "offset": "0"},
    ]


def test_plivo_reads_how_an_ended_call_ended_from_its_record(tmp_path):
    carrier = carrier_named("plivo", tmp_path)
    ended = {"call_uuid": ENDED, "from_number": "15550009999", "to_number": "15557654321",
             "initiation_time": "2026-03-02 10:00:30+00:00"}
    records = [
        {**ended, "answer_time": "2026-03-02 10:00:40+00:00", "bill_duration": 924, "hangup_cause_name": "Normal Hangup"},
        {**ended, "answer_time": None, "bill_duration": 0, "hangup_cause_code": 1000, "hangup_cause_name": "Canceled"},
        {**ended, "answer_time": None, "bill_duration": 0, "hangup_cause_name": "No Answer"},
        {**ended, "answer_time": None, "bill_duration": 0, "hangup_cause_name": "Destination Out Of Service"},
    ]
    assert [call.status for call in carrier.ended_calls(records, QUERY)] == [
        statuses.COMPLETED, statuses.CANCELED, statuses.NO_ANSWER, statuses.FAILED]


def test_plivo_cannot_tell_when_more_calls_are_queued_than_it_reads(tmp_path):
    carrier = carrier_named("plivo", tmp_path)
    full_page = {"api_id": "x", "calls": [LEFT_THE_QUEUE] * 20}
    with pytest.raises(RemoteError, match="more than 100 queued calls"):
        find(carrier, lambda request: httpx.Response(200, json=full_page))


def test_exotel_reads_the_ended_calls_between_the_numbers_created_in_the_dials_window(tmp_path):
    # Exotel writes its call times without a zone, in the account's (IST by default): 10:00 UTC is 15:30.
    call = {"DateUpdated": "2026-03-02 15:31:00", "To": "08047491899", "From": "+15557654321",
            "PhoneNumberSid": "+15550009999", "Duration": "0", "Price": "0.000", "Direction": "outbound-api",
            "RecordingUrl": None}
    page = {"Metadata": {"Total": 3, "PageSize": 100, "FirstPageUri": "/v1/Accounts/x/Calls.json",
                         "PrevPageUri": None, "NextPageUri": None}, "Calls": [
        {**call, "Sid": "c5797dcbaaeed7678c4062a4a3ed2f8a", "DateCreated": "2026-03-02 15:30:03", "Status": "no-answer"},
        {**call, "Sid": "b6cfaf5f5cef3ca0fc937749ef96d245", "DateCreated": "2026-03-02 15:29:00", "Status": "busy"},
        {**call, "Sid": "48d690c837bb0c755a1228dcb6911416", "DateCreated": "2026-03-02 15:30:05", "Status": "completed",
         "Direction": "inbound"},
    ]}
    carrier = carrier_named("exotel", tmp_path)
    found, sent = find(carrier, lambda request: httpx.Response(200, json=page))
    assert found == [PlacedCall("c5797dcbaaeed7678c4062a4a3ed2f8a", statuses.NO_ANSWER)]
    (request,) = sent
    assert request.url.path == "/v1/Accounts/exotel-test-account/Calls.json"
    assert query_of(request) == {
        "From": CALLEE, "PhoneNumber": OURS, "Direction": "outbound-api",
        "DateCreated": "gte:2026-03-02 15:30:00;lte:2026-03-02 15:31:10", "SortBy": "DateCreated:desc",
        "PageSize": "100"}
    assert CARRIERS["exotel"].lists_placed_calls_within is None  # ended calls only: none found proves nothing


def test_exotels_call_times_zone_is_a_setting(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text('[exotel]\ncall_details_utc_offset = "+08:00"\n')
    carrier = CARRIERS["exotel"](load_settings(config, double("exotel").environ(BASE)))
    page = {"Calls": [{"Sid": "c5797dcbaaeed7678c4062a4a3ed2f8a", "DateCreated": "2026-03-02 18:00:01",
                       "Status": "completed", "From": CALLEE, "Direction": "outbound-api"}]}
    found, sent = find(carrier, lambda request: httpx.Response(200, json=page))
    assert found == [PlacedCall("c5797dcbaaeed7678c4062a4a3ed2f8a", statuses.COMPLETED)]
    assert query_of(sent[0])["DateCreated"] == "gte:2026-03-02 18:00:00;lte:2026-03-02 18:01:10"
    config.write_text('[exotel]\ncall_details_utc_offset = "IST"\n')
    with pytest.raises(Exception, match="UTC offset"):
        load_settings(config, double("exotel").environ(BASE))


def test_every_carrier_can_be_asked_for_the_calls_it_placed():
    assert all(carrier.finds_placed_calls for carrier in CARRIERS.values()), json.dumps(
        {name: carrier.finds_placed_calls for name, carrier in CARRIERS.items()})
