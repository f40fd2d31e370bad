"""Everything Exotel: the Voicebot applet's dynamic URL, HTTP Basic credentials, Calls/connect and
its bidirectional stream protocol.

Exotel signs nothing. Its Voicebot applet is configured with the gateway's HTTPS endpoint (the
credentials written into that URL, https://USER:PASSWORD@host/exotel/inbound); Exotel requests it
for each call and opens the WebSocket URL the JSON answer names: Ultravox's join URL (medium
{"exotel": {}}), or the gateway's media socket in bridge mode.

Verified against Exotel's docs (developer.exotel.com AgentStream guides, the exotel/Agent-Stream
repository): the answer shape {"url": "wss://…"}; Calls/connect's parameters and answer; the stream
messages; 16-bit little-endian PCM at 8 kHz; outgoing chunks in multiples of 320 bytes. Not
documented, and so unverified: the method and query parameters of the request to the dynamic URL
(this module follows the Connect applet's dynamic URL: GET with CallSid, CallFrom, CallTo, Direction,
and accepts a POST form or JSON as well), whether Basic credentials in the URL are sent to it,
what Exotel does when that request fails, and the StatusCallback's content type (form and JSON are
both read). Exotel documents no v1 API to end or redirect a live call: closing the stream ends a
Calls/connect call (in a flow, the applet after the Voicebot runs), and operator transfers are
refused with words the agent can say.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hmac
import re
import ipaddress
import json
import secrets
from typing import Any
from urllib.parse import urlencode

import httpx
from pydantic import field_validator
from starlette.responses import Response

from .. import inputs, numbers, statuses
from ..http import RemoteError
from ..settings import CarrierSettings
from .base import (
    MAX_DURATION_SECONDS,
    sample_rate,
    FORM,
    JSON,
    QUERY,
    InboundCall,
    MalformedFrame,
    OutboundDial,
    PlacedCall,
    PlacedCallQuery,
    RequestRejected,
    SimulatedCall,
    StatusUpdate,
    StreamStart,
    Webhook,
)
from .event_stream import EventStreamCarrier

# Status words of Calls/connect answers and StatusCallbacks.
CALL_STATUSES = {
    "queued": statuses.QUEUED,
    "ringing": statuses.RINGING,
    # Exotel streams to the agent as soon as the callee picks up (its dial names the stream).
    "in-progress": statuses.IN_PROGRESS,
    "completed": statuses.COMPLETED,
    "busy": statuses.BUSY,
    "no-answer": statuses.NO_ANSWER,
    "failed": statuses.FAILED,
    "canceled": statuses.CANCELED,
}
# Raw PCM from the stream's start message: "audio/x-raw" in one page of Exotel's docs, "raw" in another.
STREAM_ENCODINGS = ("audio/x-raw", "raw", "pcm", "audio/l16", "audio/x-l16")
# StreamUrl must stay under 600 characters (Calls/connect).
MAX_STREAM_URL = 600
# Call details: at most 100 calls a page (its Bulk Call Details reference).
PLACED_CALLS_PAGE_SIZE = 100
EXOTEL_TIME = "%Y-%m-%d %H:%M:%S"


class ExotelSettings(CarrierSettings):
    account_sid: str | None = None
    api_key: str | None = None
    api_token: str | None = None
    # Singapore; accounts in Mumbai use https://api.in.exotel.com.
    api_base_url: str = "https://api.exotel.com"
    # The Basic credentials written into the Voicebot URL configured at Exotel.
    webhook_username: str | None = None
    webhook_password: str | None = None
    # Networks Exotel's requests may come from (Exotel gives its ranges on request); empty: any.
    allowed_sources: list[str] = []
    # Where numbers written in national format ("08047491899") are read.
    region: str = "IN"
    # The UTC offset of the times Exotel's call details are written in ("2019-12-03 10:48:33", no
    # zone): its docs do not say; an Indian account's are taken to be IST [unverified].
    call_details_utc_offset: str = "+05:30"

    @field_validator("call_details_utc_offset")
    @classmethod
    def _utc_offset(cls, value: str) -> str:
        if not re.fullmatch(r"[+-](0\d|1[0-4]):[0-5]\d", value):
            raise ValueError(f"{value!r} is not a UTC offset like +05:30")
        return value

    @field_validator("allowed_sources")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an address or network like 203.0.113.0/24") from None
        return value


class ExotelCarrier(EventStreamCarrier):
    name = "exotel"
    title = "Exotel"
    settings_model = ExotelSettings
    environment = {
        "EXOTEL_ACCOUNT_SID": "account_sid",
        "EXOTEL_API_KEY": "api_key",
        "EXOTEL_API_TOKEN": "api_token",
        "EXOTEL_API_BASE_URL": "api_base_url",
        "EXOTEL_WEBHOOK_USERNAME": "webhook_username",
        "EXOTEL_WEBHOOK_PASSWORD": "webhook_password",
    }
    verification_keys = ("webhook_username", "webhook_password")
    secret_keys = ("api_key", "api_token", "webhook_password")
    dial_keys = ("account_sid", "api_key", "api_token")
    webhook_formats = (QUERY, FORM, JSON)
    callback_formats = (FORM, JSON)  # StatusCallbacks are POSTs: no GET (a bare link) moves a call
    answer_media_type = "application/json"
    call_id_param = "CallSid"
    # Exotel documents no CallSid format (its examples: 32 hex digits): bounded, letters and digits.
    call_id_pattern = re.compile(r"[A-Za-z0-9_-]{1,64}")
    from_param = "CallFrom"
    to_param = "CallTo"
    call_statuses = CALL_STATUSES
    can_transfer = False
    can_hang_up = False  # no v1 API ends a call: closing its stream does (see hang_up)
    dials_into_stream = True
    # Exotel signs nothing and its status callbacks carry no credentials (reported by integrators):
    # callbacks to URLs the gateway issued are proven by the URL's own token.
    authenticates_callbacks = False
    ultravox_can_dial = False  # the exotel medium has no `outgoing`
    # Exotel's AMD (Beta, on request) covers the second leg of Connect-two-numbers only; on the
    # stream calls the gateway places it documents none (research/exotel.md §5).
    detects_machines = False

    def normalize_number(self, number: str) -> str:
        return numbers.from_carrier(number, self.config.region)

    def _written(self, number: str) -> str:
        """A number as Exotel writes it: national form inside the account's region."""
        return numbers.national(number, self.config.region) if numbers.is_e164(number) else number

    # --- authenticity: Basic credentials, optionally a source allowlist -------------------------------
    def check_source(self, webhook: Webhook) -> None:
        # The address the connection came from: behind a proxy that is the proxy's (see the README).
        if self.config.allowed_sources and not _source_allowed(webhook.client, self.config.allowed_sources):
            raise RequestRejected("this address is not among [exotel] allowed_sources", 401)

    def _verify(self, webhook: Webhook) -> None:
        username, password = _basic_credentials(webhook.headers.get("authorization"))
        # Both compared, in constant time, whatever the first gives.
        name_ok = hmac.compare_digest(username.encode(), (self.config.webhook_username or "").encode())
        password_ok = hmac.compare_digest(password.encode(), (self.config.webhook_password or "").encode())
        if not (name_ok and password_ok):
            found = ("no Basic credentials came with it" if not username and not password else
                     "the user name matches, the password does not" if name_ok else "the user name differs")
            raise RequestRejected(
                "missing or wrong Basic credentials (EXOTEL_WEBHOOK_USERNAME / _PASSWORD)", 401,
                explanation=f"{found}. Most likely cause: the URL in Exotel's Voicebot applet "
                "(https://USER:PASSWORD@YOUR_HOST/exotel/inbound) does not carry EXOTEL_WEBHOOK_USERNAME and "
                "EXOTEL_WEBHOOK_PASSWORD as USER and PASSWORD (URL-encode any special characters in them)")

    def parse_inbound(self, webhook: Webhook) -> InboundCall:
        params = webhook.flat_params()
        # The Connect applet's names (CallFrom, CallTo); Passthru-style requests say From, To.
        params.setdefault(self.from_param, params.get("From", ""))
        if not params.get(self.to_param) and params.get("To"):
            params[self.to_param] = params["To"]
        return super().parse_inbound(dataclasses.replace(webhook, params={name: [value] for name, value in params.items()}))

    # --- answers: JSON naming the stream; anything else lets the flow go on ----------------------------
    def connect_answer(self, join_url: str, parameters: dict[str, str] | None = None) -> str:
        # Our own parameters (bridge mode) are already in the URL's query, as Exotel passes them on.
        return json.dumps({"url": join_url})

    def apology_answer(self, message: str, fallback_number: str | None) -> str:
        # Exotel cannot be told to speak from here: the Voicebot applet fails and the flow's next
        # applet (the user's greeting and Connect to a person) runs. See the README.
        return json.dumps({"error": message, "fallback_number": fallback_number})

    def reject_answer(self, message: str) -> str:
        return json.dumps({"error": message})

    def hangup_answer(self) -> str:
        return json.dumps({"error": "no call to connect"})

    def answer_response(self, body: str) -> Response:
        connects = "url" in json.loads(body)
        return Response(body, status_code=200 if connects else 503, media_type=self.answer_media_type)

    # --- REST: Calls/connect, with Basic auth --------------------------------------------------------
    def rest_credentials(self) -> dict[str, Any]:
        return {"auth": (self.config.api_key, self.config.api_token)}

    rest_keys = ("account_sid", "api_key", "api_token")

    def account_path(self) -> str:
        # Active Stream Monitoring (the AgentStream docs): cheap, and it says what the streams are limited to.
        return f"/v1/Accounts/{self.config.account_sid}/ActiveStreams"

    def describe_account(self, body: Any) -> str:
        return f"{body.get('active_streams')} of {body.get('max_allowed_streams')} streams in use"

    async def place_call(self, http: httpx.AsyncClient, dial: OutboundDial, *, deadline: float) -> str | None:
        if not dial.stream_url or len(dial.stream_url) >= MAX_STREAM_URL:
            raise RemoteError(f"Exotel needs a stream URL under {MAX_STREAM_URL} characters")
        form = [
            # Exotel's From is the person called; CallerId the ExoPhone calling them. Numbers of the
            # account's region are written in national form, as Exotel writes them itself (and as
            # working integrations send them); whether E.164 works as well is unverified.
            ("From", numbers.national(dial.to, self.config.region)),
            ("CallerId", numbers.national(dial.from_, self.config.region)),
            ("StreamUrl", dial.stream_url),
            ("StreamType", "bidirectional"),
            ("StatusCallback", dial.status_url),
            *[("StatusCallbackEvents[]", event) for event in ("ringing", "answered", "terminal")],
        ]
        response = await self.rest(
            http, "POST", f"/v1/Accounts/{self.config.account_sid}/Calls/connect.json", deadline=deadline,
            # Encoded here: StatusCallbackEvents[] repeats, which httpx's `data=` cannot express.
            content=urlencode(form), headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        try:
            return str(response.json()["Call"]["Sid"])
        except (ValueError, KeyError, TypeError):
            return None  # placed; the status callbacks bring the CallSid

    # --- the calls it placed (a dial a dead process left unrecorded) --------------------------------
    # Bulk Call Details (GET /v1/Accounts/{sid}/Calls.json), filtered by the number called (From),
    # the ExoPhone (PhoneNumber), the direction and the creation time. Its calls carry no value of
    # the gateway's own (the dial's CustomField comes back in status callbacks, not in call
    # details), so a call is matched by its numbers and its creation time.
    finds_placed_calls = True
    # "Bulk Call Details will not provide ongoing calls' details" (its API reference): a dial
    # still ringing or going on is not listed, so finding none proves nothing.
    lists_placed_calls_within = None

    @property
    def _call_times(self) -> dt.timezone:
        sign = -1 if self.config.call_details_utc_offset.startswith("-") else 1
        hours, minutes = self.config.call_details_utc_offset[1:].split(":")
        return dt.timezone(sign * dt.timedelta(hours=int(hours), minutes=int(minutes)))

    async def find_placed_calls(self, http: httpx.AsyncClient, query: PlacedCallQuery, *,
                                deadline: float) -> list[PlacedCall]:
        def written(moment: dt.datetime) -> str:
            return moment.astimezone(self._call_times).strftime(EXOTEL_TIME)

        params = {
            # E.164, as its filters are documented; the ExoPhone as the dial's CallerId wrote it [unverified].
            "From": query.to, "PhoneNumber": self._written(query.from_), "Direction": "outbound-api",
            "DateCreated": f"gte:{written(query.since)};lte:{written(query.until)}",
            "SortBy": "DateCreated:desc", "PageSize": str(PLACED_CALLS_PAGE_SIZE),
        }
        response = await self.rest(http, "GET", f"/v1/Accounts/{self.config.account_sid}/Calls.json",
                                   deadline=deadline, params=params)
        return self.placed_calls(self.json_object(response, "its call details"), query)

    def placed_calls(self, body: dict[str, Any], query: PlacedCallQuery) -> list[PlacedCall]:
        """The ended calls of a Bulk Call Details page ({"Metadata", "Calls": [{"Sid", "DateCreated",
        "Status", "From", "Direction", …}]}) dialled in the query's window (a call whose creation
        time cannot be read counts: better adopted than dialled twice)."""
        since, until = query.since.replace(microsecond=0), query.until
        found = []
        calls = body.get("Calls")
        for call in calls if isinstance(calls, list) else []:
            if not isinstance(call, dict) or not isinstance(call.get("Sid"), str) or not call["Sid"]:
                continue
            called = call.get("From")
            if isinstance(called, str) and called and self.normalize_number(called) != query.to:
                continue
            if call.get("Direction") not in (None, "outbound-api"):
                continue
            created = self._call_time(call.get("DateCreated"))
            if created is None or since <= created <= until:
                found.append(PlacedCall(call["Sid"], self.call_statuses.get(str(call.get("Status") or "").lower())))
        return found

    def _call_time(self, value: Any) -> dt.datetime | None:
        if not isinstance(value, str):
            return None
        try:
            return dt.datetime.strptime(value, EXOTEL_TIME).replace(tzinfo=self._call_times)
        except ValueError:
            return None

    async def hang_up(self, http: httpx.AsyncClient, carrier_call_id: str, *, deadline: float) -> None:
        # No v1 API ends a call: the bridge closing the stream is the hang-up (it ends a Calls/connect
        # call; in a flow, the applet after the Voicebot runs).
        return None

    def parse_status(self, webhook: Webhook) -> StatusUpdate:
        params = webhook.flat_params()
        status = params.get("Status") or params.get("CallStatus") or ""
        if params.get("EventType") == "answered":
            status = "in-progress"
        duration = params.get("ConversationDuration") or params.get("Duration") or ""
        return StatusUpdate(
            status=self.call_statuses.get(status.lower()),
            carrier_call_id=params.get("CallSid"),
            duration_seconds=inputs.whole_number_or_none(duration, maximum=MAX_DURATION_SECONDS),
        )


    # --- media stream --------------------------------------------------------------------------------
    media_encoding = "l16-le"
    media_rate = 8000
    # Chunks must be multiples of 320 bytes (20 ms at 8 kHz); another size leaves a short packet,
    # heard as a gap.
    media_chunk_ms = 20
    media_start_encodings = STREAM_ENCODINGS

    stream_id_key = "stream_sid"

    def stream_start(self, data: dict, start: dict) -> StreamStart:
        # Exotel's docs write stream_sid; its own bridges also read streamSid.
        stream_id = data.get("stream_sid") or start.get("stream_sid") or data.get("streamSid") or start.get("streamSid")
        if not stream_id:
            raise MalformedFrame("start without stream_sid")
        media_format = start.get("media_format") or {}
        return StreamStart(
            str(stream_id), start.get("call_sid") or start.get("callSid"),
            str(media_format.get("encoding") or "audio/x-raw"),
            sample_rate(media_format.get("sample_rate"), self.media_rate),
            dict(start.get("custom_parameters") or {}),
        )

    def media_audio(self, stream_id: str, payload: bytes) -> str:
        # Only the payload is documented. Exotel's own bridges also send chunk and timestamp, which
        # some Calls/connect streams are reported to need [unverified; not sent].
        return json.dumps({"event": "media", "stream_sid": stream_id,
                           "media": {"payload": base64.b64encode(payload).decode()}})

    def media_mark(self, stream_id: str, name: str) -> str:
        return json.dumps({"event": "mark", "stream_sid": stream_id, "mark": {"name": name}})

    def media_clear(self, stream_id: str) -> str:
        return json.dumps({"event": "clear", "stream_sid": stream_id})

    # --- the carrier's own side (gateway simulate) -------------------------------------------------
    def simulated_inbound(self, *, from_: str, to: str) -> SimulatedCall:
        call_id = secrets.token_hex(16)
        return SimulatedCall(call_id, {  # national format, as Exotel writes its numbers
            "CallSid": call_id, "CallFrom": self._written(from_), "CallTo": self._written(to),
            "Direction": "incoming",
        })

    def simulated_signature(self, url, params, body, private_key=None) -> dict[str, str]:
        if not (self.config.webhook_username and self.config.webhook_password):
            raise ValueError("EXOTEL_WEBHOOK_USERNAME and EXOTEL_WEBHOOK_PASSWORD are needed to call as Exotel")
        credentials = f"{self.config.webhook_username}:{self.config.webhook_password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}

    def connected_stream(self, answer: str) -> tuple[str, dict[str, str]] | None:
        url = json.loads(answer).get("url")
        return (url, {}) if isinstance(url, str) and url else None

    def simulated_start(self, stream_id, call_id, parameters) -> list[str]:
        start = {"stream_sid": stream_id, "call_sid": call_id, "account_sid": self.config.account_sid or "",
                 "custom_parameters": dict(parameters),
                 "media_format": {"encoding": "audio/x-raw", "sample_rate": str(self.media_rate), "bit_rate": "16"}}
        return [json.dumps({"event": "connected"}),
                json.dumps({"event": "start", "sequence_number": 1, "stream_sid": stream_id, "start": start})]

    def simulated_audio(self, stream_id, payload, sequence, timestamp_ms) -> str:
        return json.dumps({"event": "media", "sequence_number": sequence, "stream_sid": stream_id, "media": {
            "chunk": sequence, "timestamp": str(timestamp_ms), "payload": base64.b64encode(payload).decode()}})


def _basic_credentials(header: str | None) -> tuple[str, str]:
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        username, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return "", ""
    return username, password


def _source_allowed(client: str | None, networks: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(client or "")
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(network, strict=False) for network in networks)
