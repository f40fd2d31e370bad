"""The media-stream protocol Twilio's Media Streams made common, spoken by Twilio, Telnyx and Exotel:
JSON text frames, connected/start/media/dtmf/mark/stop from the carrier, media/mark/clear to it.
The carriers differ only in their start message and in where a message names its stream."""

from __future__ import annotations

import json
from abc import abstractmethod
from typing import ClassVar

from .base import (
    Carrier,
    StreamAudio,
    StreamClear,
    StreamDtmf,
    StreamEvent,
    StreamMark,
    StreamOther,
    StreamStart,
    StreamStop,
    b64_payload,
    json_message,
    number_or_none,
)


class EventStreamCarrier(Carrier):
    stream_id_key: ClassVar[str]  # where the carrier's messages name their stream

    @abstractmethod
    def stream_start(self, data: dict, start: dict) -> StreamStart:
        """The carrier's `start` message (where the stream id and media format live differs)."""

    def _parse_media(self, message: str | bytes) -> StreamEvent:
        data = json_message(message)
        event = data["event"]
        if event == "media":
            media = data.get("media") or {}
            return StreamAudio(b64_payload(media.get("payload")), number_or_none(media.get("timestamp")))
        if event == "start":
            return self.stream_start(data, data.get("start") or {})
        if event == "dtmf":
            return StreamDtmf(str((data.get("dtmf") or {}).get("digit", "")))
        if event == "mark":
            return StreamMark(str((data.get("mark") or {}).get("name", "")))
        if event == "stop":
            return StreamStop()
        return StreamOther(event)

    # --- the carrier's own side (gateway simulate) -------------------------------------------------
    def simulated_mark_played(self, stream_id: str, name: str) -> str:
        return json.dumps({"event": "mark", self.stream_id_key: stream_id, "mark": {"name": name}})

    def simulated_stop(self, stream_id: str) -> str:
        return json.dumps({"event": "stop", self.stream_id_key: stream_id, "stop": {}})

    def parse_outgoing(self, message: str | bytes) -> StreamAudio | StreamMark | StreamClear | StreamOther:
        data = json_message(message)
        if data["event"] == "media":
            return StreamAudio(b64_payload((data.get("media") or {}).get("payload")), None)
        if data["event"] == "clear":
            return StreamClear()
        if data["event"] == "mark":
            return StreamMark(str((data.get("mark") or {}).get("name", "")))
        return StreamOther(data["event"])
