"""The TwiML dialect shared by Twilio and Telnyx TeXML (Telnyx's TeXML is TwiML-compatible)."""

from __future__ import annotations

from typing import Any

from twilio.twiml.voice_response import VoiceResponse

from .base import Carrier


class TwimlCarrier(Carrier):
    xml_media_type = "text/xml"

    def stream_attributes(self, join_url: str) -> dict[str, Any]:
        """Attributes of <Connect><Stream>; carriers add what their media stream needs."""
        return {"url": join_url}

    def connect_xml(self, join_url: str) -> str:
        response = VoiceResponse()
        response.connect().stream(**self.stream_attributes(join_url))
        return response.to_xml()

    def apology_xml(self, message: str, fallback_number: str | None) -> str:
        response = VoiceResponse()
        response.say(message)
        if fallback_number:
            response.dial(fallback_number)
        response.hangup()
        return response.to_xml()

    def reject_xml(self, message: str) -> str:
        response = VoiceResponse()
        response.say(message)
        response.hangup()
        return response.to_xml()
