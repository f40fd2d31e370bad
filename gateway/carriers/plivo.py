"""Everything Plivo: V3 webhook signature and Plivo XML."""

from __future__ import annotations

import base64
import datetime as dt
import re
import hashlib
import hmac
import json
import secrets
import uuid
import xml.etree.ElementTree as ET
from typing import Any, Mapping

import httpx
from plivo import plivoxml
from plivo.utils.signature_v3 import construct_post_url

from .. import inputs, statuses
from ..http import RemoteError
from ..settings import CarrierSettings
from .base import (
    MAX_DURATION_SECONDS,
    sample_rate,
    Carrier,
    DialResult,
    MachineDetection,
    ReplayKey,
    MalformedFrame,
    OutboundDial,
    PlacedCall,
    PlacedCallQuery,
    SignatureRejected,
    SimulatedCall,
    StatusUpdate,
    StreamAudio,
    StreamClear,
    StreamDtmf,
    StreamEvent,
    StreamMark,
    StreamOther,
    StreamStart,
    StreamStop,
    Webhook,
    b64_payload,
    json_message,
)



class PlivoSettings(CarrierSettings):
    auth_id: str | None = None
    auth_token: str | None = None
    api_base_url: str = "https://api.plivo.com"

# CallStatus values sent to ring_url and hangup_url.
CALL_STATUSES = {
    "ringing": statuses.RINGING,
    "in-progress": statuses.ANSWERED,
    "completed": statuses.COMPLETED,
    "busy": statuses.BUSY,
    "failed": statuses.FAILED,
    "timeout": statuses.NO_ANSWER,
    "no-answer": statuses.NO_ANSWER,
    "cancel": statuses.CANCELED,
}

# A live call's call_status (Retrieve a live call); a queued one's is "queued".
LIVE_CALL_STATUSES = {"ringing": statuses.RINGING, "in-progress": statuses.ANSWERED}
# Plivo's lists answer at most 20 calls a page; a lookup reads this many pages of each at most
# (more calls than that: it cannot tell, and asks again later).
PAGE_LIMIT = 20
MAX_PAGES = 5
# An ended call's record has no status word: it is read from its hangup cause (Plivo's list of
# hangup causes: 1000 "Canceled", by the Hangup API before the answer). The callee's busy and
# no-answer causes are recognised by their names here, not their codes [unverified].
CANCELED_CAUSE = 1000

# Longest wait for a voicemail's beep before the message is left anyway (peers wait about 30 s:
# less cuts long greetings short).
VOICEMAIL_BEEP_WAIT_SECONDS = 30

# Ultravox's plivo medium speaks 16 kHz linear PCM.
STREAM_CONTENT_TYPE = "audio/x-l16;rate=16000"


class PlivoCarrier(Carrier):
    name = "plivo"
    title = "Plivo"
    settings_model = PlivoSettings
    environment = {
        "PLIVO_AUTH_ID": "auth_id",
        "PLIVO_AUTH_TOKEN": "auth_token",
        "PLIVO_API_BASE_URL": "api_base_url",
    }
    verification_keys = ("auth_token",)
    secret_keys = ("auth_token",)
    dial_keys = ("auth_id", "auth_token")
    call_id_param = "CallUUID"
    signature_headers = ("x-plivo-signature-v3", "x-plivo-signature-ma-v3")
    # CallUUID: a UUID.
    call_id_pattern = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
    call_statuses = CALL_STATUSES
    # Phone numbers arrive as digits with the country code ("15551230001"): the base reads them so.

    def rest_credentials(self) -> dict[str, Any]:
        return {"auth": (self.config.auth_id, self.config.auth_token)}

    rest_keys = ("auth_id", "auth_token")

    def account_path(self) -> str:
        return f"/v1/Account/{self.config.auth_id}/"  # "Retrieve account details"

    def describe_account(self, body: Any) -> str:
        return f"account {body.get('name')!r} ({body.get('account_type')})"

    @property
    def _calls(self) -> str:
        return f"/v1/Account/{self.config.auth_id}/Call/"

    def _verify(self, webhook: Webhook) -> None:
        nonce = webhook.headers.get("x-plivo-signature-v3-nonce")
        sent = [
            webhook.headers.get("x-plivo-signature-v3"),
            # signed with the main account's token when the call belongs to a subaccount
            webhook.headers.get("x-plivo-signature-ma-v3"),
        ]
        if not nonce or not any(sent):
            raise SignatureRejected("missing X-Plivo-Signature-V3 or X-Plivo-Signature-V3-Nonce header")
        expected = self.v3_signature(webhook)
        # A header may carry several comma-separated signatures (token rotation).
        candidates = [s.strip().encode() for header in sent if header for s in header.split(",")]
        if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
            raise SignatureRejected("X-Plivo-Signature-V3 does not match this request",
                                    explanation=self.url_signature_explanation(webhook.url))

    def replay_key(self, webhook: Webhook) -> ReplayKey | None:
        # V3 signs a nonce but no time: a captured request verifies forever, so its nonce is
        # remembered for [gateway] replay_memory_hours. (Plivo documents the nonce as unique per
        # request; whether a retry re-sends it is not documented: a repeat is a replay or a retry.)
        nonce = webhook.headers.get("x-plivo-signature-v3-nonce")
        return ReplayKey(nonce) if nonce else None

    def v3_signature(self, webhook: Webhook) -> bytes:
        """base64(HMAC-SHA256(auth token, signed URL + "." + nonce)); the URL is built by Plivo's SDK."""
        params = {k: v[0] if len(v) == 1 else list(v) for k, v in webhook.params.items()}
        signed_url = construct_post_url(webhook.url, params)  # webhooks are POSTed forms
        nonce = webhook.headers.get("x-plivo-signature-v3-nonce", "")
        message = signed_url + b"." + nonce.encode()
        digest = hmac.new((self.config.auth_token or "").encode(), message, hashlib.sha256).digest()
        return base64.b64encode(digest)

    def connect_answer(self, join_url: str, parameters: dict[str, str] | None = None) -> str:
        response = plivoxml.ResponseElement()
        response.add(
            plivoxml.StreamElement(
                join_url, bidirectional=True, keepCallAlive=True, contentType=STREAM_CONTENT_TYPE
            )
        )
        return response.to_string()

    def apology_answer(self, message: str, fallback_number: str | None) -> str:
        response = plivoxml.ResponseElement()
        response.add(plivoxml.SpeakElement(message))
        if fallback_number:
            dial = plivoxml.DialElement()
            dial.add(plivoxml.NumberElement(fallback_number.lstrip("+")))
            response.add(dial)
        response.add(plivoxml.HangupElement())
        return response.to_string()

    def hangup_answer(self) -> str:
        response = plivoxml.ResponseElement()
        response.add(plivoxml.HangupElement())
        return response.to_string()

    def voicemail_answer(self, message: str) -> str:
        # Plivo reports a machine while it still greets, and no end of the greeting: <Wait beep>
        # waits for the beep (at most `length` seconds) before the message (its Wait XML docs).
        response = plivoxml.ResponseElement()
        response.add(plivoxml.WaitElement(length=VOICEMAIL_BEEP_WAIT_SECONDS, beep=True))
        response.add(plivoxml.SpeakElement(message))
        response.add(plivoxml.HangupElement())
        return response.to_string()

    # --- outbound ---------------------------------------------------------------------------------
    async def place_call(self, http: httpx.AsyncClient, dial: OutboundDial, *, deadline: float) -> str | None:
        body = {
            # Plivo's own examples write numbers as bare digits.
            "from": dial.from_.lstrip("+"),
            "to": dial.to.lstrip("+"),
            "answer_url": dial.answer_url,
            "answer_method": "POST",
            "ring_url": dial.status_url,
            "ring_method": "POST",
            "hangup_url": dial.status_url,
            "hangup_method": "POST",
            "ring_timeout": dial.ring_timeout_seconds,
        }
        if dial.machine_detection:
            body.update(self.detection_params(dial.machine_detection))
        await self.rest(http, "POST", self._calls, deadline=deadline, json=body)
        # Plivo answers with a request_uuid; the call's own CallUUID (what its call-control API
        # wants) arrives with the first callback.
        return None

    # --- the calls it placed (a dial a dead process left unrecorded) --------------------------------
    # Plivo keeps a dial in one of three lists as it goes: queued (over the account's calls per
    # second: "Retrieve all queued calls", request_uuids only, no filters), live ("Retrieve all live
    # calls", call_uuids, filtered by numbers and direction) and, once over, its call detail
    # records ("Retrieve details of all calls"). They are read in that order, so a call moving on
    # meanwhile is met in the next. None of them returns the dial's URLs or anything else of the
    # gateway's own (caller_name would carry a value, but the callee's phone shows it): a call is
    # matched by its numbers and its creation time.
    finds_placed_calls = True
    # How soon an ended call's record is listed Plivo does not say: a dial is taken as never placed
    # only once it has been missing from all three lists for this long [unverified].
    lists_placed_calls_within = 120.0

    async def find_placed_calls(self, http: httpx.AsyncClient, query: PlacedCallQuery, *,
                                deadline: float) -> list[PlacedCall]:
        found: list[PlacedCall] = []
        for request_uuid in await self._listed_ids(http, {"status": "queued"}, deadline=deadline):
            queued = await self._listed_call(http, request_uuid, "queued", deadline=deadline)
            if queued is not None and self._dialled(queued.get("from"), queued.get("to"), query):
                found.append(PlacedCall(None, statuses.QUEUED))  # its CallUUID comes with its first callback
        numbers = {"call_direction": "outbound", "from_number": query.from_.lstrip("+"),
                   "to_number": query.to.lstrip("+")}
        for call_uuid in await self._listed_ids(http, {"status": "live", **numbers}, deadline=deadline):
            live = await self._listed_call(http, call_uuid, "live", deadline=deadline)
            if live is not None and self._dialled(live.get("from"), live.get("to"), query):
                found.append(self.live_call(live))
        since = query.since.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        ended = await self._pages(http, {**numbers, "end_time__gte": since}, deadline=deadline)
        found += self.ended_calls(ended, query)
        return found

    def live_call(self, call: Mapping[str, Any]) -> PlacedCall:
        """One call of "Retrieve a live call"."""
        return PlacedCall(str(call.get("call_uuid") or "") or None,
                          LIVE_CALL_STATUSES.get(str(call.get("call_status") or "")))

    def ended_calls(self, records: list[Any], query: PlacedCallQuery) -> list[PlacedCall]:
        """The call detail records ("Retrieve details of all calls") of calls initiated in the
        query's window, newest first (an initiation time that cannot be read counts)."""
        since, until = query.since.replace(microsecond=0), query.until
        found = []
        for record in records:
            if not isinstance(record, dict) or not record.get("call_uuid"):
                continue
            if not self._dialled(record.get("from_number"), record.get("to_number"), query):
                continue
            initiated = _local_time_or_none(record.get("initiation_time"))
            if initiated is None or since <= initiated <= until:
                found.append(PlacedCall(str(record["call_uuid"]), self._ended_status(record)))
        return found

    @staticmethod
    def _ended_status(record: Mapping[str, Any]) -> str:
        """How an ended call ended, from its call detail record (which has no status word)."""
        if record.get("answer_time") or _count(record.get("bill_duration")):
            return statuses.COMPLETED
        if _count(record.get("hangup_cause_code")) == CANCELED_CAUSE:
            return statuses.CANCELED
        cause = str(record.get("hangup_cause_name") or "").lower()
        if "busy" in cause:
            return statuses.BUSY
        if "no answer" in cause or "timeout" in cause:
            return statuses.NO_ANSWER
        return statuses.FAILED

    def _dialled(self, from_: Any, to: Any, query: PlacedCallQuery) -> bool:
        """Whether a listed call went from and to the query's numbers (Plivo writes them with or
        without the "+", and its filters match prefixes too)."""
        return (isinstance(from_, str) and isinstance(to, str) and self.normalize_number(from_) == query.from_
                and self.normalize_number(to) == query.to)

    async def _listed_ids(self, http: httpx.AsyncClient, params: dict[str, str], *, deadline: float) -> list[str]:
        """The ids a queued or live list names, page by page: {"api_id", "calls": [id, …]}."""
        ids: list[str] = []
        for page in range(MAX_PAGES):
            body = await self._json(http, self._calls, deadline=deadline,
                                    params={**params, "limit": str(PAGE_LIMIT), "offset": str(page * PAGE_LIMIT)})
            listed = body.get("calls")
            if not isinstance(listed, list):
                raise RemoteError(f"{self.title} answered its call list without a list of calls")
            ids += [str(call_id) for call_id in listed if isinstance(call_id, str) and call_id]
            if len(listed) < PAGE_LIMIT:
                return ids
        raise RemoteError(f"{self.title} lists more than {MAX_PAGES * PAGE_LIMIT} {params['status']} calls")

    async def _listed_call(self, http: httpx.AsyncClient, call_id: str, status: str, *,
                           deadline: float) -> Mapping[str, Any] | None:
        """One queued or live call; None once it has left that list (it is met in the next)."""
        if not self.call_id_pattern.fullmatch(call_id):
            return None
        response = await self.rest(http, "GET", f"{self._calls}{call_id}/", deadline=deadline, gone_ok=True,
                                   params={"status": status})
        if response.status_code in self.gone_statuses:
            return None
        return self.json_object(response)

    async def _pages(self, http: httpx.AsyncClient, params: dict[str, str], *, deadline: float) -> list[Any]:
        """Call detail records, page by page: {"meta": {"next", …}, "objects": […]}."""
        records: list[Any] = []
        for page in range(MAX_PAGES):
            body = await self._json(http, self._calls, deadline=deadline,
                                    params={**params, "limit": str(PAGE_LIMIT), "offset": str(page * PAGE_LIMIT)})
            objects = body.get("objects")
            if not isinstance(objects, list):
                raise RemoteError(f"{self.title} answered its call records without a list of them")
            records += objects
            meta = body.get("meta")
            if not (isinstance(meta, dict) and meta.get("next")):
                return records
        raise RemoteError(f"{self.title} has more than {MAX_PAGES * PAGE_LIMIT} call records to read")

    async def _json(self, http: httpx.AsyncClient, path: str, *, deadline: float, params: dict[str, str]) -> Mapping[str, Any]:
        return self.json_object(await self.rest(http, "GET", path, deadline=deadline, params=params))


    def detection_params(self, detection: MachineDetection) -> dict[str, Any]:
        """Plivo's machine detection (its Call API and asynchronous machine detection pages): with a
        machine_detection_url it runs in the background and posts Machine=true there (only for a
        machine: a person is never reported); without one the call's XML waits for it, and "hangup"
        has Plivo hang a machine up itself (its hangup_url then says Machine=true). It has no verdict
        for the end of a greeting."""
        if detection.report_url:
            return {"machine_detection": "true", "machine_detection_url": detection.report_url,
                    "machine_detection_method": "POST"}
        return {"machine_detection": "hangup"}

    async def redirect(self, http: httpx.AsyncClient, carrier_call_id: str, url: str, *, deadline: float) -> None:
        await self.rest(http, "POST", f"{self._calls}{carrier_call_id}/", deadline=deadline,
                        json={"legs": "aleg", "aleg_url": url, "aleg_method": "POST"})

    def dial_answer(self, *, say: str | None, target: str, action_url: str, ring_timeout: int, caller_id: str | None) -> str:
        response = plivoxml.ResponseElement()
        if say:
            response.add(plivoxml.SpeakElement(say))
        dial = plivoxml.DialElement(
            action=action_url, method="POST", timeout=ring_timeout, caller_id=caller_id.lstrip("+") if caller_id else None,
        )
        dial.add(plivoxml.UserElement(target) if target.startswith("sip") else plivoxml.NumberElement(target.lstrip("+")))
        response.add(dial)
        return response.to_string()

    def parse_dial_result(self, webhook: Webhook) -> DialResult:
        # DialStatus: completed | busy | failed | timeout | no-answer
        status = webhook.param("DialStatus") or "failed"
        caller_gone = webhook.param("CallStatus") in ("completed", "cancel")
        return DialResult(answered=status in ("completed", "answered"), status=status, caller_gone=caller_gone)

    # Plivo fetches waitSound as XML (Play / Speak / Wait), not as audio.
    hold_music_is_answer = True

    def conference_answer(
        self, name: str, *, say: str | None, starts: bool, ends: bool, wait_url: str | None, action_url: str | None
    ) -> str:
        response = plivoxml.ResponseElement()
        if say:
            response.add(plivoxml.SpeakElement(say))
        response.add(plivoxml.ConferenceElement(
            name, start_conference_on_enter=starts, end_conference_on_exit=ends, wait_sound=wait_url,
            action=action_url, method="POST" if action_url else None,
        ))
        return response.to_string()

    def hold_music_answer(self, music_url: str | None) -> str:
        response = plivoxml.ResponseElement()
        if music_url:
            response.add(plivoxml.PlayElement(music_url, loop=0))
        else:
            response.add(plivoxml.SpeakElement("Please stay on the line."))
            response.add(plivoxml.WaitElement(length=8))
        return response.to_string()

    def whisper_answer(self, briefing: str, *, accept_url: str, timeout: int) -> str:
        response = plivoxml.ResponseElement()
        digits = plivoxml.GetDigitsElement(action=accept_url, method="POST", timeout=timeout, num_digits=1, retries=1)
        digits.add(plivoxml.SpeakElement(briefing))
        response.add(digits)
        response.add(plivoxml.SpeakElement("No key was pressed. Goodbye."))
        response.add(plivoxml.HangupElement())
        return response.to_string()

    # Plivo's hang-up API "can also be used to cancel a queued outbound call" (its docs): the base's
    # cancel. It needs the CallUUID, which arrives with the first callback (see place_call).
    async def hang_up(self, http: httpx.AsyncClient, carrier_call_id: str, *, deadline: float) -> None:
        await self.rest(http, "DELETE", f"{self._calls}{carrier_call_id}/", deadline=deadline, gone_ok=True)

    # Audio streams: we ask for audio/x-l16 at 16 kHz (little-endian) both ways.
    media_encoding = "l16-le"
    media_rate = 16000

    media_start_encodings = ("audio/x-l16",)

    def media_mark(self, stream_id: str, name: str) -> str:
        return json.dumps({"event": "checkpoint", "streamId": stream_id, "name": name})

    def _parse_media(self, message: str | bytes) -> StreamEvent:
        data = json_message(message)
        event = data["event"]
        if event == "media":
            media = data.get("media") or {}
            return StreamAudio(b64_payload(media.get("payload")), None)  # Plivo's timestamp is wall-clock
        if event == "start":
            start = data.get("start") or {}
            media_format = start.get("mediaFormat") or {}
            stream_id = start.get("streamId") or data.get("streamId")
            if not stream_id:
                raise MalformedFrame("start without streamId")
            return StreamStart(stream_id, start.get("callId"), str(media_format.get("encoding", "audio/x-l16")),
                               sample_rate(media_format.get("sampleRate"), self.media_rate))
        if event == "dtmf":
            return StreamDtmf(str((data.get("dtmf") or {}).get("digit", "")))
        if event in ("playedStream", "played"):
            return StreamMark(str(data.get("name", "")))
        if event == "stop":
            return StreamStop()
        return StreamOther(event)

    def media_audio(self, stream_id: str, payload: bytes) -> str:
        return json.dumps({"event": "playAudio", "streamId": stream_id, "media": {
            "contentType": "audio/x-l16", "sampleRate": self.media_rate, "payload": base64.b64encode(payload).decode(),
        }})

    def media_clear(self, stream_id: str) -> str:
        return json.dumps({"event": "clearAudio", "streamId": stream_id})

    def outgoing_status_params(self, status_url: str) -> dict[str, Any]:
        return {"ring_url": status_url, "ring_method": "POST", "hangup_url": status_url, "hangup_method": "POST"}

    def answered_by(self, params: Mapping[str, str]) -> str | None:
        machine = params.get("Machine", "").lower()
        return {"true": statuses.MACHINE, "false": statuses.HUMAN}.get(machine)

    def parse_status(self, webhook: Webhook) -> StatusUpdate:
        params = webhook.flat_params()
        duration = params.get("Duration", "")
        return StatusUpdate(
            status=self.call_statuses.get(params.get("CallStatus", "")),
            carrier_call_id=params.get("CallUUID"),
            duration_seconds=inputs.whole_number_or_none(duration, maximum=MAX_DURATION_SECONDS),
            end_reason=params.get("HangupCause") or None,
            answered_by=self.answered_by(params),
        )

    def reject_answer(self, message: str) -> str:
        response = plivoxml.ResponseElement()
        response.add(plivoxml.SpeakElement(message))
        response.add(plivoxml.HangupElement())
        return response.to_string()

    # --- the carrier's own side (gateway simulate) -------------------------------------------------
    def simulated_inbound(self, *, from_: str, to: str) -> SimulatedCall:
        call_id = str(uuid.uuid4())
        return SimulatedCall(call_id, {  # Plivo writes numbers as digits
            "CallUUID": call_id, "From": from_.lstrip("+"), "To": to.lstrip("+"), "CallStatus": "ringing",
            "Direction": "inbound", "Event": "StartApp",
        })

    def simulated_signature(self, url, params, body, private_key=None) -> dict[str, str]:
        if not self.config.auth_token:
            raise ValueError("PLIVO_AUTH_TOKEN is needed to sign as Plivo")
        nonce = secrets.token_hex(10)
        webhook = Webhook(url, "POST", {"x-plivo-signature-v3-nonce": nonce}, body,
                          {name: [value] for name, value in params.items()})
        return {"X-Plivo-Signature-V3": self.v3_signature(webhook).decode(), "X-Plivo-Signature-V3-Nonce": nonce}

    def connected_stream(self, answer: str) -> tuple[str, dict[str, str]] | None:
        stream = ET.fromstring(answer).find("Stream")
        return (stream.text.strip(), {}) if stream is not None and stream.text else None

    def simulated_start(self, stream_id, call_id, parameters) -> list[str]:
        return [json.dumps({"event": "start", "sequenceNumber": 1, "start": {
            "callId": call_id, "streamId": stream_id, "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": self.media_rate}}})]

    def simulated_audio(self, stream_id, payload, sequence, timestamp_ms) -> str:
        return json.dumps({"event": "media", "sequenceNumber": sequence, "streamId": stream_id, "media": {
            "track": "inbound", "timestamp": str(timestamp_ms), "chunk": sequence,
            "payload": base64.b64encode(payload).decode()}})

    def simulated_mark_played(self, stream_id, name) -> str:
        return json.dumps({"event": "playedStream", "streamId": stream_id, "name": name})

    def simulated_stop(self, stream_id) -> str:
        return json.dumps({"event": "stop", "streamId": stream_id})

    def parse_outgoing(self, message):
        data = json_message(message)
        if data["event"] == "playAudio":
            return StreamAudio(b64_payload((data.get("media") or {}).get("payload")), None)
        if data["event"] == "clearAudio":
            return StreamClear()
        if data["event"] == "checkpoint":
            return StreamMark(str(data.get("name", "")))
        return StreamOther(data["event"])


def _count(value: Any) -> int | None:
    """A whole number a JSON body writes as a number or as digits; None otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return inputs.whole_number_or_none(value, maximum=MAX_DURATION_SECONDS)


def _local_time_or_none(value: Any) -> dt.datetime | None:
    """A call detail record's time, written in the console's time zone with its offset
    ("2015-07-26 15:44:49+05:30"); None where it is not one (or carries no offset)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
