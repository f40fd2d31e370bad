"""The TwiML dialect shared by Twilio and Telnyx TeXML (Telnyx's TeXML is TwiML-compatible)."""

from __future__ import annotations

import datetime as dt
import email.utils
import xml.etree.ElementTree as ET
from typing import Any, ClassVar, Mapping

import httpx
from twilio.twiml.voice_response import VoiceResponse

from .. import inputs, statuses
from .base import (
    MAX_DURATION_SECONDS, DialResult, MachineDetection, PlacedCall, PlacedCallQuery, StatusUpdate, Webhook,
)
from .event_stream import EventStreamCarrier

# CallStatus values of Twilio and of Telnyx's TwiML-compatible callbacks.
CALL_STATUSES = {
    "queued": statuses.QUEUED,
    "initiated": statuses.QUEUED,
    "ringing": statuses.RINGING,
    # Answered: the agent joins once the gateway has handled the answer webhook.
    "in-progress": statuses.ANSWERED,
    "answered": statuses.ANSWERED,
    "completed": statuses.COMPLETED,
    "busy": statuses.BUSY,
    "no-answer": statuses.NO_ANSWER,
    "failed": statuses.FAILED,
    "canceled": statuses.CANCELED,
}
STATUS_CALLBACK_EVENTS = ["initiated", "ringing", "answered", "completed"]
# AnsweredBy, Twilio's and Telnyx TeXML's (its AMD callback reference lists Twilio's seven; its
# guide writes "machine"): a machine_end_* verdict comes once the greeting has ended (DetectMessageEnd).
ANSWERED_BY = {
    "human": statuses.HUMAN,
    "machine": statuses.MACHINE,
    "machine_start": statuses.MACHINE,
    "machine_end_beep": statuses.MACHINE,
    "machine_end_silence": statuses.MACHINE,
    "machine_end_other": statuses.MACHINE,
    "fax": statuses.FAX,
    "unknown": statuses.UNKNOWN,
}


class TwimlCarrier(EventStreamCarrier):
    answer_media_type = "text/xml"
    call_statuses = CALL_STATUSES
    reports_greeting_end = True  # MachineDetection=DetectMessageEnd
    # AsyncAmd as the create-call body spells true (a form's text, or a JSON boolean).
    async_amd: ClassVar[Any] = "true"

    def detection_params(self, detection: MachineDetection) -> dict[str, Any]:
        """Create-call parameters asking for `detection` (Twilio's names, which TeXML shares): async
        (AsyncAmd) with a report URL, else the call's instructions wait for the verdict."""
        params: dict[str, Any] = {"MachineDetection": "DetectMessageEnd" if detection.greeting_end else "Enable"}
        if detection.report_url:
            params.update(AsyncAmd=self.async_amd, AsyncAmdStatusCallback=detection.report_url,
                          AsyncAmdStatusCallbackMethod="POST")
        return params

    def stream_attributes(self, join_url: str) -> dict[str, Any]:
        """Attributes of <Connect><Stream>; carriers add what their media stream needs."""
        return {"url": join_url}

    def connect_answer(self, join_url: str, parameters: dict[str, str] | None = None) -> str:
        response = VoiceResponse()
        response.connect().stream(**self.stream_attributes(join_url))
        return response.to_xml()

    def apology_answer(self, message: str, fallback_number: str | None) -> str:
        response = VoiceResponse()
        response.say(message)
        if fallback_number:
            response.dial(fallback_number)
        response.hangup()
        return response.to_xml()

    def reject_answer(self, message: str) -> str:
        response = VoiceResponse()
        response.say(message)
        response.hangup()
        return response.to_xml()

    def hangup_answer(self) -> str:
        response = VoiceResponse()
        response.hangup()
        return response.to_xml()

    def voicemail_answer(self, message: str) -> str:
        # Fetched on a machine_end_* verdict (DetectMessageEnd): the greeting is over, speak now.
        response = VoiceResponse()
        response.say(message)
        response.hangup()
        return response.to_xml()

    def dial_answer(self, *, say: str | None, target: str, action_url: str, ring_timeout: int, caller_id: str | None) -> str:
        response = VoiceResponse()
        if say:
            response.say(say)
        dial = response.dial(action=action_url, method="POST", timeout=ring_timeout, caller_id=caller_id)
        if target.startswith("sip"):
            dial.sip(target)
        else:
            dial.number(target)
        return response.to_xml()

    def parse_dial_result(self, webhook: Webhook) -> DialResult:
        # DialCallStatus: completed | answered | busy | no-answer | failed | canceled
        status = webhook.param("DialCallStatus") or "failed"
        # CallStatus is the caller's own leg: ended means they hung up while it rang.
        caller_gone = status == "canceled" or webhook.param("CallStatus") in ("completed", "canceled")
        return DialResult(answered=status in ("completed", "answered"), status=status, caller_gone=caller_gone)

    def conference_answer(
        self, name: str, *, say: str | None, starts: bool, ends: bool, wait_url: str | None, action_url: str | None
    ) -> str:
        response = VoiceResponse()
        if say:
            response.say(say)
        dial = response.dial(action=action_url, method="POST") if action_url else response.dial()
        dial.conference(name, start_conference_on_enter=starts, end_conference_on_exit=ends, beep=False, wait_url=wait_url)
        return response.to_xml()

    def whisper_answer(self, briefing: str, *, accept_url: str, timeout: int) -> str:
        response = VoiceResponse()
        response.gather(num_digits=1, action=accept_url, method="POST", timeout=timeout).say(briefing)
        response.say("No key was pressed. Goodbye.")
        response.hangup()
        return response.to_xml()

    def answered_by(self, params: Mapping[str, str]) -> str | None:
        value = params.get("AnsweredBy")
        if not value:
            return None
        return ANSWERED_BY.get(value, statuses.MACHINE if value.startswith("machine") else statuses.UNKNOWN)

    def greeting_ended(self, params: Mapping[str, str]) -> bool:
        return params.get("AnsweredBy", "").startswith("machine_end")

    def parse_status(self, webhook: Webhook) -> StatusUpdate:
        params = webhook.flat_params()
        duration = params.get("CallDuration", "")
        return StatusUpdate(
            status=self.call_statuses.get(params.get("CallStatus", "")),
            carrier_call_id=params.get(self.call_id_param),
            duration_seconds=inputs.whole_number_or_none(duration, maximum=MAX_DURATION_SECONDS),
            end_reason=params.get("HangupCause") or params.get("ErrorMessage") or None,
            answered_by=self.answered_by(params),
        )

    # --- the calls it placed (a dial a dead process left unrecorded) --------------------------------
    finds_placed_calls = True
    # Twilio's "Read multiple Call resources" and Telnyx's TeXML "Fetch multiple call resources"
    # take the same filters and answer the same page: {"calls": [{"sid", "status", "date_created"
    # (RFC 2822, whole seconds), ...}], newest first. Neither returns the dial's URLs or anything
    # else of the gateway's own, so a call is matched by its numbers and its creation time.
    placed_calls_page_size: ClassVar[int] = 50

    @property
    def placed_calls_path(self) -> str:
        """The call list (under api_base_url)."""
        raise NotImplementedError

    async def find_placed_calls(self, http: httpx.AsyncClient, query: PlacedCallQuery, *,
                                deadline: float) -> list[PlacedCall]:
        response = await self.rest(http, "GET", self.placed_calls_path, deadline=deadline, params={
            "To": query.to, "From": query.from_, "PageSize": str(self.placed_calls_page_size)})
        return self.placed_calls(self.json_object(response, "its call list"), query)

    def placed_calls(self, body: Mapping[str, Any], query: PlacedCallQuery) -> list[PlacedCall]:
        """The calls of a call-list page created in the query's window (a call whose creation time
        cannot be read counts: better adopted than dialled twice)."""
        # date_created has whole seconds: a call created in the second of `since` counts.
        since, until = query.since.replace(microsecond=0), query.until
        found = []
        calls = body.get("calls")
        for call in calls if isinstance(calls, list) else []:
            if not isinstance(call, dict) or not isinstance(call.get("sid"), str) or not call["sid"]:
                continue
            created = _rfc2822_or_none(call.get("date_created"))
            if created is None or since <= created <= until:
                found.append(PlacedCall(call["sid"], self.call_statuses.get(str(call.get("status") or ""))))
        return found

    # --- the carrier's own side (gateway simulate) -------------------------------------------------
    def connected_stream(self, answer: str) -> tuple[str, dict[str, str]] | None:
        stream = ET.fromstring(answer).find("Connect/Stream")
        url = stream.get("url") if stream is not None else None
        if stream is None or not url:
            return None
        return url, {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


def _rfc2822_or_none(value: Any) -> dt.datetime | None:
    """An RFC 2822 date with its zone ("Thu, 15 Jun 2023 09:56:45 +0000"); None where it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else None
