"""The Carrier interface every flow uses. A carrier module owns its wire format; flows never see it."""

from __future__ import annotations

import base64
import binascii
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import httpx

from ..settings import Settings


class RequestRejected(Exception):
    """The request is not acceptable; answer `status` with `detail` and change nothing."""

    status = 400

    def __init__(self, detail: str, status: int | None = None):
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status


class SignatureRejected(RequestRejected):
    status = 403


class MalformedWebhook(RequestRejected):
    status = 400


@dataclass(frozen=True)
class Webhook:
    """A carrier's HTTP request as the carrier sent it, before any interpretation."""

    url: str  # the URL the carrier addressed: public base URL + path + query
    method: str
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    params: Mapping[str, list[str]] = field(default_factory=dict)  # form fields, all values

    def param(self, name: str) -> str | None:
        values = self.params.get(name)
        return values[-1] if values else None

    def flat_params(self) -> dict[str, str]:
        return {name: values[-1] for name, values in self.params.items() if values}


@dataclass(frozen=True)
class OutboundDial:
    """An outbound call for the carrier to place; the URLs point back at the gateway."""

    to: str
    from_: str
    answer_url: str  # fetched when the callee answers; answers with the connect XML
    status_url: str  # call progress callbacks
    ring_timeout_seconds: int
    machine_detection: bool = False


@dataclass(frozen=True)
class AnsweredCall:
    carrier_call_id: str | None
    machine: bool  # an answering machine (or fax) picked up, as far as the carrier could tell


@dataclass(frozen=True)
class StatusUpdate:
    """A carrier's call progress callback in the gateway's words."""

    status: str | None  # one of gateway.store's statuses; None when the carrier's is not one we track
    carrier_call_id: str | None
    duration_seconds: int | None = None
    end_reason: str | None = None
    answered_by: str | None = None


@dataclass(frozen=True)
class DialResult:
    """How a <Dial> to an operator ended, from its action callback."""

    answered: bool
    status: str  # the carrier's own word (no-answer, busy, failed, …), for the record
    caller_gone: bool = False  # the caller hung up while the operator's phone rang


# --- media stream events (bridge mode), in the gateway's words -------------------------------------


class MalformedFrame(ValueError):
    """A media-stream message that cannot be understood; logged and skipped, never fatal."""


@dataclass(frozen=True)
class StreamStart:
    stream_id: str
    carrier_call_id: str | None
    encoding: str  # the carrier's name for it, checked against what the gateway asked for
    rate: int
    parameters: dict = field(default_factory=dict)  # custom parameters given with the stream


@dataclass(frozen=True)
class StreamAudio:
    payload: bytes  # in the carrier's encoding
    timestamp_ms: float | None  # the carrier's media timestamp, for gap detection


@dataclass(frozen=True)
class StreamDtmf:
    digit: str


@dataclass(frozen=True)
class StreamMark:
    name: str


@dataclass(frozen=True)
class StreamStop:
    pass


@dataclass(frozen=True)
class StreamOther:
    event: str


StreamEvent = StreamStart | StreamAudio | StreamDtmf | StreamMark | StreamStop | StreamOther


def json_message(text: str | bytes) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except ValueError:
        raise MalformedFrame("not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        raise MalformedFrame("no event")
    return message


def number_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def b64_payload(value: Any) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise MalformedFrame("payload is not base64") from None


@dataclass(frozen=True)
class InboundCall:
    carrier: str
    call_id: str
    from_number: str
    to_number: str
    params: Mapping[str, str]  # every webhook parameter, for template context


class Carrier(ABC):
    """The shared flow once; each carrier states only what differs."""

    name: ClassVar[str]
    xml_media_type: ClassVar[str] = "application/xml"
    call_id_param: ClassVar[str]
    from_param: ClassVar[str] = "From"
    to_param: ClassVar[str] = "To"

    def __init__(self, settings: Settings):
        self.settings = settings

    # --- authenticity ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def can_verify(self) -> bool:
        """Whether the secret needed to check this carrier's signatures is configured."""

    @abstractmethod
    def _verify(self, webhook: Webhook) -> None:
        """Raise SignatureRejected unless the carrier signed this exact request."""

    def verify(self, webhook: Webhook) -> None:
        if self.settings.insecure_skip_signature_verification:
            return
        if not self.can_verify:
            raise SignatureRejected(f"{self.name} signature secret is not configured on this gateway")
        self._verify(webhook)

    # --- parsing --------------------------------------------------------------------------------
    def parse_inbound(self, webhook: Webhook) -> InboundCall:
        params = webhook.flat_params()
        # From may be empty for a withheld caller id; that caller still deserves an answer.
        missing = [p for p in (self.call_id_param, self.to_param) if not params.get(p)]
        if missing:
            raise MalformedWebhook(f"missing {', '.join(missing)} in {self.name} webhook")
        return InboundCall(
            carrier=self.name,
            call_id=params[self.call_id_param],
            from_number=self.normalize_number(params.get(self.from_param, "")),
            to_number=self.normalize_number(params[self.to_param]),
            params=params,
        )

    def normalize_number(self, number: str) -> str:
        """E.164 where the carrier sent a phone number; SIP URIs and client names stay as they are."""
        return number.strip()

    # --- Ultravox -------------------------------------------------------------------------------
    def ultravox_medium(self) -> dict[str, Any]:
        return {self.name: {}}

    def outgoing_medium(self, to: str, from_: str, status_url: str) -> dict[str, Any]:
        """Medium for Ultravox to place the call itself, with progress callbacks to the gateway."""
        outgoing = {"to": to, "from": from_, "additionalParams": self.outgoing_status_params(status_url)}
        return {self.name: {"outgoing": outgoing}}

    @abstractmethod
    def outgoing_status_params(self, status_url: str) -> dict[str, Any]:
        """The carrier's create-call parameters that send progress callbacks to `status_url`."""

    # --- outbound calls ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def can_dial(self) -> bool:
        """Whether the REST credentials needed to place calls are configured."""

    @abstractmethod
    async def place_call(self, http: httpx.AsyncClient, dial: OutboundDial, *, deadline: float) -> str | None:
        """Ask the carrier to place the call; returns its call id when the answer carries one.

        Raises gateway.http.RemoteError; retries only what cannot dial twice.
        """

    def parse_answer(self, webhook: Webhook) -> AnsweredCall:
        params = webhook.flat_params()
        return AnsweredCall(carrier_call_id=params.get(self.call_id_param), machine=self.answered_by_machine(params))

    @abstractmethod
    def answered_by_machine(self, params: Mapping[str, str]) -> bool:
        """Whether the answer webhook says a machine picked up."""

    @abstractmethod
    def parse_status(self, webhook: Webhook) -> StatusUpdate:
        """The call progress callback, in the gateway's statuses."""

    @abstractmethod
    def hangup_xml(self) -> str:
        """XML that ends the call at once."""

    # --- live call control and transfers ------------------------------------------------------------
    @abstractmethod
    async def redirect(self, http: httpx.AsyncClient, carrier_call_id: str, url: str, *, deadline: float) -> None:
        """Make the live call fetch and run new XML from `url` (which ends its current stream).

        Raises gateway.http.RemoteError, also when the call has already ended.
        """

    @abstractmethod
    def dial_xml(self, *, say: str | None, target: str, action_url: str, ring_timeout: int, caller_id: str | None) -> str:
        """Say `say`, then ring `target` (E.164 or SIP URI); `action_url` hears how it ended."""

    @abstractmethod
    def parse_dial_result(self, webhook: Webhook) -> DialResult:
        """The action callback of dial_xml's <Dial>."""

    # Whether the conference's hold music must be a URL of XML that plays it (else the audio itself).
    hold_music_is_xml: ClassVar[bool] = False

    @abstractmethod
    def conference_xml(
        self, name: str, *, say: str | None, starts: bool, ends: bool, wait_url: str | None, action_url: str | None
    ) -> str:
        """Join conference `name`; `starts`: the conference begins when this leg joins (others hear
        `wait_url` until then); `ends`: it ends when this leg leaves; `action_url` hears when this
        leg leaves the conference."""

    def hold_music_xml(self, music_url: str | None) -> str:
        """XML playing hold music in a loop (carriers whose hold music is XML)."""
        raise NotImplementedError

    @abstractmethod
    def whisper_xml(self, briefing: str, *, accept_url: str, timeout: int) -> str:
        """Brief an operator and ask for a key press; the digits go to `accept_url`."""

    def pressed_digits(self, webhook: Webhook) -> str:
        return webhook.param("Digits") or ""

    # --- media stream (bridge mode) ---------------------------------------------------------------
    # The encoding and rate the gateway asks the carrier to stream (and Ultravox to speak).
    media_encoding: ClassVar[str]  # gateway.media.codecs encoding name
    media_rate: ClassVar[int]

    # Whether upgrade_problem proves the carrier sent the socket (then the token may come later).
    upgrade_is_signed: ClassVar[bool] = False

    def upgrade_problem(self, url: str, headers: Mapping[str, str]) -> str | None:
        """Why the carrier's media-socket upgrade request is not authentic, or None.

        Carriers that sign nothing on the upgrade rely on the gateway's media token alone.
        """
        return None

    # The start message's encoding (lower-cased) when the carrier streams what the gateway asked for.
    media_start_encodings: ClassVar[tuple[str, ...]]

    def media_start_problem(self, start: StreamStart) -> str | None:
        if start.encoding.lower() not in self.media_start_encodings or start.rate != self.media_rate:
            return f"the carrier streams {start.encoding} at {start.rate} Hz, not {self.media_encoding} at {self.media_rate} Hz"
        return None

    def parse_media(self, message: str | bytes) -> StreamEvent:
        """One message from the carrier's media socket. Raises MalformedFrame, never anything else."""
        try:
            return self._parse_media(message)
        except MalformedFrame:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as error:  # a field of the wrong shape
            raise MalformedFrame(f"unexpected message shape ({type(error).__name__})") from None

    @abstractmethod
    def _parse_media(self, message: str | bytes) -> StreamEvent:
        """One message from the carrier's media socket."""

    @abstractmethod
    def media_mark(self, stream_id: str, name: str) -> str:
        """A marker the carrier echoes once the audio sent before it has been played."""

    @abstractmethod
    def media_audio(self, stream_id: str, payload: bytes) -> str:
        """A message playing `payload` (carrier encoding) to the caller."""

    @abstractmethod
    def media_clear(self, stream_id: str) -> str:
        """A message dropping every queued, unplayed audio at once (barge-in)."""

    @abstractmethod
    async def hang_up(self, http: httpx.AsyncClient, carrier_call_id: str, *, deadline: float) -> None:
        """End the live call. A call that has already ended counts as success."""

    # --- answers --------------------------------------------------------------------------------
    @abstractmethod
    def connect_xml(self, join_url: str, parameters: dict[str, str] | None = None) -> str:
        """XML that connects the call's audio to a stream URL (Ultravox's join URL, or the gateway's
        media socket); `parameters` go with the stream where the carrier supports stream parameters."""

    @abstractmethod
    def apology_xml(self, message: str, fallback_number: str | None) -> str:
        """XML that speaks `message`, then dials `fallback_number` if given, then hangs up."""

    @abstractmethod
    def reject_xml(self, message: str) -> str:
        """XML that politely turns the caller away."""
