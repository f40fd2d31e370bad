"""The Carrier interface every flow uses. A carrier module owns its wire format; flows never see it."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import httpx
from starlette.responses import Response

from .. import inputs, numbers, statuses
from ..media.codecs import AudioFormat
from ..http import RemoteError, RetryPolicy, request_with_retries, transport_problem
from ..settings import CarrierSettings, Settings


class RequestRejected(Exception):
    """The request is not acceptable; answer `status` with `detail` and change nothing.

    `explanation` goes to the log only, never into the answer: what was checked, against which
    setting, and the most likely cause, so that a person can fix it."""

    status = 400

    def __init__(self, detail: str, status: int | None = None, *, explanation: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.explanation = explanation
        if status is not None:
            self.status = status


class SignatureRejected(RequestRejected):
    status = 403


class MalformedWebhook(RequestRejected):
    status = 400


class CallGone(RemoteError):
    """The carrier no longer has the call (it ended); for a hang-up, that is success."""


def carrier_leg(carrier_call_id: str | None) -> str:
    """The carrier's id of a call to act on; RemoteError, as a refusal by the carrier would be, while
    the carrier has not named the call yet."""
    if not carrier_call_id:
        raise RemoteError("the carrier has not named this call yet")
    return carrier_call_id


@dataclass(frozen=True)
class WebhookFormat:
    """How a carrier's webhooks carry their parameters."""

    name: str
    method: str
    content_type: str | None  # None: a GET, parameters in the query


FORM = WebhookFormat("form", "POST", "application/x-www-form-urlencoded")
JSON = WebhookFormat("json", "POST", "application/json")
QUERY = WebhookFormat("query", "GET", None)


@dataclass(frozen=True)
class Webhook:
    """A carrier's HTTP request as the carrier sent it, before any interpretation."""

    url: str  # the URL the carrier addressed: public base URL + path + query
    method: str
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    params: Mapping[str, list[str]] = field(default_factory=dict)  # form/query fields (JSON: top-level scalars)
    client: str | None = None  # the sending address, for carriers that sign nothing
    format: WebhookFormat = FORM

    def param(self, name: str) -> str | None:
        values = self.params.get(name)
        return values[-1] if values else None

    def flat_params(self) -> dict[str, str]:
        return {name: values[-1] for name, values in self.params.items() if values}


@dataclass(frozen=True)
class ReplayKey:
    """The one-time part of a signed webhook, and how long a replay of it could pass the signature
    check (None: indefinitely, so remembered for `[gateway] replay_memory_hours`)."""

    value: str
    window_seconds: float | None = None


@dataclass(frozen=True)
class MachineDetection:
    """Answering-machine detection asked for with a dial (carriers that detects_machines)."""

    # Asynchronous: the call's instructions run at once (a person never waits in silence) and the
    # verdict is reported here. None: the call's instructions wait for the verdict, and a machine
    # gets none (the carrier or the gateway hangs it up): for a leg that must not hear a word first.
    report_url: str | None = None
    # A machine is reported once its greeting has ended (to speak after the beep), where the
    # carrier can tell (reports_greeting_end).
    greeting_end: bool = False


@dataclass(frozen=True)
class PlacedCallQuery:
    """A dial whose process died before it recorded the carrier's answer: which of the carrier's
    calls could be it (to `to`, from `from_`, created from `since` to `until`)."""

    to: str
    from_: str
    since: dt.datetime
    until: dt.datetime


@dataclass(frozen=True)
class PlacedCall:
    """One of the carrier's calls, as its call list has it."""

    # None: a dial the carrier still holds in its queue, which it names with its first callback
    # (to the URLs of the dial, so the record learns it then).
    carrier_call_id: str | None
    status: str | None  # neutral (gateway.statuses); None: a word the gateway does not know


@dataclass(frozen=True)
class OutboundDial:
    """An outbound call for the carrier to place; the URLs point back at the gateway."""

    to: str
    from_: str
    answer_url: str  # fetched when the callee answers; answers with the connect XML
    status_url: str  # call progress callbacks
    ring_timeout_seconds: int
    machine_detection: MachineDetection | None = None
    # Carriers whose dial names the media stream itself (dials_into_stream): where to stream.
    stream_url: str | None = None


@dataclass(frozen=True)
class AnsweredCall:
    carrier_call_id: str | None
    answered_by: str | None = None  # statuses.ANSWERED_BY, where the answer request says

    @property
    def machine(self) -> bool:
        """An answering machine (or a fax) picked up, as far as the carrier could tell."""
        return self.answered_by in (statuses.MACHINE, statuses.FAX)


@dataclass(frozen=True)
class MachineVerdict:
    """What answering-machine detection found, from a carrier's callback."""

    carrier_call_id: str | None
    answered_by: str  # statuses.ANSWERED_BY
    greeting_ended: bool = False  # a machine's greeting is over: a message now follows the beep

    @property
    def machine(self) -> bool:
        return self.answered_by in (statuses.MACHINE, statuses.FAX)


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


@dataclass(frozen=True)
class StreamClear:
    """Gateway to carrier: drop the queued audio (barge-in)."""


StreamEvent = StreamStart | StreamAudio | StreamDtmf | StreamMark | StreamStop | StreamOther


@dataclass(frozen=True)
class SimulatedCall:
    """An inbound call as the carrier would announce it (`gateway simulate`)."""

    call_id: str
    params: dict[str, str]


# Far above any telephony stream's (8, 16, 24 kHz); a larger number is not a rate.
MAX_SAMPLE_RATE = 192_000
# A call's duration in seconds: a year is far more than any call lasts.
MAX_DURATION_SECONDS = 366 * 24 * 3600


def json_message(text: str | bytes) -> dict[str, Any]:
    try:
        message = inputs.json_document(text)
    except inputs.InvalidInput:
        raise MalformedFrame("not JSON, or nested too deeply") from None
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        raise MalformedFrame("no event")
    return message


def number_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def sample_rate(value: Any, default: int) -> int:
    """A media format's sample rate, as a JSON number or its digits; `default` where it is left out."""
    if value is None or value == "" or value == 0:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SAMPLE_RATE:
        return value
    if isinstance(value, str):
        try:
            return inputs.whole_number(value, name="sample rate", minimum=1, maximum=MAX_SAMPLE_RATE)
        except inputs.InvalidInput:
            pass
    raise MalformedFrame(f"sample rate {str(value)[:20]!r} is not a rate in Hz")


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

    name: ClassVar[str]  # in URLs, the config section, metadata and the record
    title: ClassVar[str]  # in messages: "Twilio"
    settings_model: ClassVar[type[CarrierSettings]]  # its [name] section in the config file
    environment: ClassVar[Mapping[str, str]] = {}  # environment variable -> key of that section
    # Where numbers the carrier sends in national format are read (None: it sends E.164 or digits
    # with the country code).
    default_region: ClassVar[str | None] = None

    # --- webhooks: how they arrive, how they are answered ---------------------------------------
    webhook_formats: ClassVar[tuple[WebhookFormat, ...]] = (FORM,)
    # How its callbacks to URLs the gateway issued (status, answer, transfer steps) arrive, where
    # that differs from its webhooks.
    callback_formats: ClassVar[tuple[WebhookFormat, ...] | None] = None
    answer_media_type: ClassVar[str] = "application/xml"
    call_id_param: ClassVar[str]
    # The shape of the carrier's call ids: anything else is refused before it reaches the store or
    # Ultravox (a signed field's text moved into the id would otherwise make a new call). Carriers
    # that document no format bound the length and the characters.
    call_id_pattern: ClassVar[re.Pattern[str]] = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
    from_param: ClassVar[str] = "From"
    to_param: ClassVar[str] = "To"
    # The carrier's call status words -> gateway.statuses (words not listed are not tracked).
    call_statuses: ClassVar[Mapping[str, str]] = {}

    # --- what the carrier can do ----------------------------------------------------------------
    # A live call can be moved to new call instructions (redirect): operator transfers need it.
    can_transfer: ClassVar[bool] = True
    # Its REST API ends a live call (hang_up, cancel); else the call ends when its media stream
    # closes, which ending the Ultravox call does.
    can_hang_up: ClassVar[bool] = True
    # Its dial API takes the stream URL itself, rather than fetching an answer URL on pick-up:
    # the Ultravox call then exists before the phone rings.
    dials_into_stream: ClassVar[bool] = False
    # Ultravox can place calls on this carrier itself (medium.<carrier>.outgoing).
    ultravox_can_dial: ClassVar[bool] = True
    # Its callbacks to URLs the gateway issued are authenticated like its webhooks (else the URL's
    # own token is the proof).
    authenticates_callbacks: ClassVar[bool] = True
    # It tells answering machines from people on the calls the gateway places (OutboundDial.machine_detection).
    detects_machines: ClassVar[bool] = True
    # Its detection can report a machine once the greeting has ended (MachineDetection.greeting_end).
    reports_greeting_end: ClassVar[bool] = False

    def __init__(self, settings: Settings):
        self.settings = settings
        self.config = getattr(settings, self.name)

    def warnings(self) -> list[str]:
        """Configuration a person should fix for this carrier (settings are valid otherwise)."""
        if self.settings.insecure_skip_signature_verification or self.can_verify:
            return []
        missing = " / ".join(var for var, key in self.environment.items() if key in self.verification_keys)
        return [f"{missing or 'the ' + self.title + ' secret'} is not set: {self.title} webhooks will be refused"]

    # What one webhook may weigh, refused before it is parsed or its signature computed: a flood of
    # forged requests must stay cheap. Far above what any carrier sends (a few dozen fields, 2–3 KB).
    webhook_max_fields: ClassVar[int] = 128
    webhook_max_bytes: ClassVar[int] = 16 * 1024
    # Headers carrying the signature: a request with none of them is refused before its body is read.
    signature_headers: ClassVar[tuple[str, ...]] = ()

    verification_keys: ClassVar[tuple[str, ...]] = ()  # settings keys that webhook checks need
    # Settings keys holding credentials: their values are removed from every log line.
    secret_keys: ClassVar[tuple[str, ...]] = ()

    def secrets(self) -> list[str]:
        """The configured values of its secret_keys."""
        return [value for key in self.secret_keys if (value := getattr(self.config, key))]

    # --- authenticity ---------------------------------------------------------------------------
    @property
    def can_verify(self) -> bool:
        """Whether the secret needed to check this carrier's webhooks is configured."""
        return all(getattr(self.config, key) for key in self.verification_keys)

    @abstractmethod
    def _verify(self, webhook: Webhook) -> None:
        """Raise SignatureRejected unless the carrier sent this exact request."""

    def replay_key(self, webhook: Webhook) -> ReplayKey | None:
        """What makes this signed webhook one of a kind, for the gateway to remember (a second
        delivery with it is a replay, or a retry the carrier re-sent unchanged). None: the carrier
        signs nothing one-time, and replays are answered as retries are (one Ultravox call per
        carrier call, one media token per call)."""
        return None

    def check_source(self, webhook: Webhook) -> None:  # noqa: B027 (a hook: most carriers check no source)
        """Raise RequestRejected when the request comes from where the carrier's never do."""

    def url_signature_explanation(self, url: str, secret_keys: tuple[str, ...] | None = None) -> str:
        """Why a signature over `url` (the URL the gateway checked) most likely did not match: for the
        log of a carrier that signs the URL it calls."""
        public_url = self.settings.public_url
        built_from = (f"GATEWAY_PUBLIC_URL ([gateway] public_url = {public_url}) and the request's path" if public_url
                      else "the address the request arrived on, since GATEWAY_PUBLIC_URL ([gateway] public_url) is not "
                      "set")
        secret = " / ".join(self.variables(secret_keys or self.verification_keys))
        return (f"checked against {url}, built from {built_from}. Most likely cause: {self.title} calls another URL "
                f"(the one in its console, or behind a proxy or tunnel): set GATEWAY_PUBLIC_URL to exactly the scheme, "
                f"host, port and path prefix {self.title} calls. Otherwise {secret} is not that of the {self.title} "
                "account sending it")

    def refuse_unsigned(self, headers: Mapping[str, str], *, issued_url: bool = False) -> None:
        """Raise SignatureRejected, before the body is read, when no signature header came at all."""
        if self.settings.insecure_skip_signature_verification or not self.signature_headers:
            return
        if issued_url and not self.authenticates_callbacks:
            return
        if not any(headers.get(name) for name in self.signature_headers):
            raise SignatureRejected(f"missing {' or '.join(self.signature_headers)} header")

    def verify(self, webhook: Webhook, *, issued_url: bool = False) -> None:
        """Raise RequestRejected unless the carrier sent `webhook`; `issued_url`: to a URL the gateway
        issued (whose own token the caller checks)."""
        if self.settings.insecure_skip_signature_verification:
            return
        if not self.can_verify:
            raise SignatureRejected(f"{self.title} webhook credentials are not configured on this gateway")
        self.check_source(webhook)
        if issued_url and not self.authenticates_callbacks:
            return  # the URL's own token is the proof
        self._verify(webhook)

    def formats(self, *, callback: bool) -> tuple[WebhookFormat, ...]:
        """The formats its webhooks (or, `callback`, its callbacks) arrive in."""
        return (self.callback_formats or self.webhook_formats) if callback else self.webhook_formats

    # --- parsing --------------------------------------------------------------------------------
    def parse_inbound(self, webhook: Webhook) -> InboundCall:
        params = webhook.flat_params()
        # From may be empty for a withheld caller id; that caller still deserves an answer.
        missing = [p for p in (self.call_id_param, self.to_param) if not params.get(p)]
        if missing:
            raise MalformedWebhook(f"missing {', '.join(missing)} in {self.title} webhook")
        if not self.call_id_pattern.fullmatch(params[self.call_id_param]):
            raise MalformedWebhook(f"{self.call_id_param} is not a {self.title} call id")
        return InboundCall(
            carrier=self.name,
            call_id=params[self.call_id_param],
            from_number=self.normalize_number(params.get(self.from_param, "")),
            to_number=self.normalize_number(params[self.to_param]),
            params=params,
        )

    def check_call_id(self, webhook: Webhook) -> None:
        """Refuse a callback naming a carrier call id that is not in the carrier's shape, as the
        inbound webhook is: the id is stored and looked up, whatever route it arrives on."""
        call_id = webhook.param(self.call_id_param)
        if call_id and not self.call_id_pattern.fullmatch(call_id):
            raise MalformedWebhook(f"{self.call_id_param} is not a {self.title} call id")

    def normalize_number(self, number: str) -> str:
        """E.164 where the carrier sent a phone number; SIP URIs and client names stay as they are."""
        return numbers.from_carrier(number, self.default_region)

    # --- REST: one helper for every call to the carrier's API -------------------------------------
    # 429 means "not processed"; the only other retries are errors before sending.
    @property
    def rest_policy(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=3, attempt_timeout=self.config.request_timeout_seconds)

    # Statuses meaning "no such call (any more)"; a hang-up counts them as success.
    gone_statuses: ClassVar[tuple[int, ...]] = (404,)

    def rest_credentials(self) -> dict[str, Any]:
        """httpx request arguments that authenticate to the carrier's API (auth=…, headers=…)."""
        return {}

    async def rest(
        self, http: httpx.AsyncClient, method: str, path: str, *, deadline: float, gone_ok: bool = False,
        **request: Any,
    ) -> httpx.Response:
        """`method` the carrier's API at `path` (under its api_base_url), retried only where it cannot act
        twice. Returns a 2xx response; raises CallGone for a call that has ended (unless `gone_ok`), and
        RemoteError, in one wording, for anything else."""
        credentials = self.rest_credentials()
        headers = {**credentials.pop("headers", {}), **request.pop("headers", {})}
        response = await request_with_retries(
            http, method, f"{self.config.api_base_url}{path}", service=self.title, policy=self.rest_policy,
            deadline=deadline, headers=headers, **credentials, **request,
        )
        if 200 <= response.status_code < 300:
            return response
        if response.status_code in self.gone_statuses:
            if gone_ok:
                return response
            raise CallGone(f"{self.title} no longer has this call (it ended)")
        raise RemoteError(f"{self.title} answered {response.status_code}: {response.text[:200]}")

    # --- the account: `gateway check --online` reads it to prove the REST credentials -------------
    # Settings keys of the REST credentials (none: no REST API to check).
    rest_keys: ClassVar[tuple[str, ...]] = ()

    def account_path(self) -> str:
        """A cheap authenticated GET of the carrier's API (under its api_base_url) that reads the account."""
        raise NotImplementedError(f"{self.title} has no account to read")

    def describe_account(self, body: Any) -> str:
        """What the account read answered (its JSON), in a few words."""
        return "the credentials work"

    def variables(self, keys: tuple[str, ...]) -> list[str]:
        """The environment variables of settings `keys` (the [section] key where there is none)."""
        by_key = {key: variable for variable, key in self.environment.items()}
        return [by_key.get(key, f"[{self.name}] {key}") for key in keys]

    async def read_account(self, http: httpx.AsyncClient, *, timeout: float) -> str:
        """Read the account with the configured credentials; what it says, else RemoteError saying
        what to fix."""
        url = f"{self.config.api_base_url}{self.account_path()}"
        credentials = self.rest_credentials()
        try:
            response = await http.get(url, timeout=timeout, **credentials)
        except httpx.HTTPError as error:
            variable = self.variables(("api_base_url",))[0]
            raise RemoteError(f"cannot reach {self.config.api_base_url} ({transport_problem(error)}): check {variable}"
                              ) from None
        if response.status_code in (401, 403):
            raise RemoteError(f"{self.title} refused the credentials ({response.status_code}): check "
                              + " and ".join(self.variables(self.rest_keys)))
        if response.status_code == 404:
            raise RemoteError(f"{self.title} knows no such account (404 for {url}): check "
                              + " and ".join(self.variables(self.rest_keys)))
        if not 200 <= response.status_code < 300:
            raise RemoteError(f"{self.title} answered {response.status_code}: {response.text[:200]}")
        return self.describe_account(self.json_object(response, url))

    def json_object(self, response: httpx.Response, what: str = "") -> dict[str, Any]:
        """The body of a REST answer (to `what`, for the message) as a JSON object; RemoteError if not."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise RemoteError(f"{self.title} answered {what + ' ' if what else ''}with a body that is not a JSON object")
        return body

    # --- Ultravox -------------------------------------------------------------------------------
    def ultravox_medium(self) -> dict[str, Any]:
        return {self.name: {}}

    def outgoing_medium(self, to: str, from_: str, status_url: str) -> dict[str, Any]:
        """Medium for Ultravox to place the call itself, with progress callbacks to the gateway."""
        outgoing = {"to": to, "from": from_, "additionalParams": self.outgoing_status_params(status_url)}
        return {self.name: {"outgoing": outgoing}}

    def outgoing_status_params(self, status_url: str) -> dict[str, Any]:
        """The carrier's create-call parameters that send progress callbacks to `status_url`
        (carriers Ultravox can dial on)."""
        raise NotImplementedError(f"Ultravox cannot place {self.title} calls")

    # --- outbound calls ---------------------------------------------------------------------------
    dial_keys: ClassVar[tuple[str, ...]] = ()  # settings keys that placing calls needs

    @property
    def can_dial(self) -> bool:
        """Whether the REST credentials needed to place calls are configured."""
        return bool(self.dial_keys) and all(getattr(self.config, key) for key in self.dial_keys)

    @abstractmethod
    async def place_call(self, http: httpx.AsyncClient, dial: OutboundDial, *, deadline: float) -> str | None:
        """Ask the carrier to place the call; returns its call id when the answer carries one.

        Raises gateway.http.RemoteError; retries only what cannot dial twice.
        """

    # Whether `find_placed_calls` can ask the carrier (else a dial left unrecorded by a dead process
    # stays unknown: failed, never placed again).
    finds_placed_calls: ClassVar[bool] = False
    # How long after a dial the carrier's call list surely shows the call it placed, whatever its
    # state (a list written a little after the fact shows it late): a dial found in none of its
    # lists after that was never placed. None: the list may not show a call still going on
    # (Exotel lists ended calls only), so finding none proves nothing.
    lists_placed_calls_within: ClassVar[float | None] = 0.0

    async def find_placed_calls(self, http: httpx.AsyncClient, query: PlacedCallQuery, *,
                                deadline: float) -> list[PlacedCall]:
        """The carrier's calls that match `query`, newest first. Raises RemoteError, also when it
        cannot tell (more calls than it reads)."""
        raise NotImplementedError(f"{self.title} cannot be asked for the calls it placed")

    def parse_answer(self, webhook: Webhook) -> AnsweredCall:
        params = webhook.flat_params()
        return AnsweredCall(carrier_call_id=params.get(self.call_id_param), answered_by=self.answered_by(params))

    def answered_by(self, params: Mapping[str, str]) -> str | None:
        """Who picked up, in statuses.ANSWERED_BY words, where a request's parameters say (else None)."""
        return None

    def greeting_ended(self, params: Mapping[str, str]) -> bool:
        """Whether a request reporting a machine says its greeting has ended."""
        return False

    def parse_machine_verdict(self, webhook: Webhook) -> MachineVerdict | None:
        """The verdict of answering-machine detection in a callback (its report URL's, or a status
        callback carrying one); None when the callback carries none."""
        params = webhook.flat_params()
        answered_by = self.answered_by(params)
        if answered_by is None:
            return None
        return MachineVerdict(params.get(self.call_id_param), answered_by, self.greeting_ended(params))

    @abstractmethod
    def parse_status(self, webhook: Webhook) -> StatusUpdate:
        """The call progress callback, in the gateway's statuses."""

    @abstractmethod
    def hangup_answer(self) -> str:
        """An answer that ends the call at once."""

    def voicemail_answer(self, message: str) -> str:
        """An answer leaving `message` on the answering machine that took the call, then hanging up.
        Fetched once detection has found the machine (carriers that detects_machines): after its
        greeting where the carrier reports its end, else the answer itself waits for the beep."""
        raise NotImplementedError(f"{self.title} detects no answering machines")

    # --- live call control and transfers (carriers that can_transfer) ------------------------------
    async def redirect(self, http: httpx.AsyncClient, carrier_call_id: str, url: str, *, deadline: float) -> None:
        """Make the live call fetch and run new XML from `url` (which ends its current stream).

        Raises gateway.http.RemoteError, also when the call has already ended.
        """
        raise NotImplementedError(f"{self.title} cannot move a live call")

    def dial_answer(self, *, say: str | None, target: str, action_url: str, ring_timeout: int, caller_id: str | None) -> str:
        """Say `say`, then ring `target` (E.164 or SIP URI); `action_url` hears how it ended."""
        raise NotImplementedError

    def parse_dial_result(self, webhook: Webhook) -> DialResult:
        """The action callback of dial_answer's <Dial>."""
        raise NotImplementedError

    # Whether the conference's hold music must be a URL of XML that plays it (else the audio itself).
    hold_music_is_answer: ClassVar[bool] = False

    def conference_answer(
        self, name: str, *, say: str | None, starts: bool, ends: bool, wait_url: str | None, action_url: str | None
    ) -> str:
        """Join conference `name`; `starts`: the conference begins when this leg joins (others hear
        `wait_url` until then); `ends`: it ends when this leg leaves; `action_url` hears when this
        leg leaves the conference."""
        raise NotImplementedError

    def hold_music_answer(self, music_url: str | None) -> str:
        """XML playing hold music in a loop (carriers whose hold music is XML)."""
        raise NotImplementedError

    def whisper_answer(self, briefing: str, *, accept_url: str, timeout: int) -> str:
        """Brief an operator and ask for a key press; the digits go to `accept_url`."""
        raise NotImplementedError

    def pressed_digits(self, webhook: Webhook) -> str:
        return webhook.param("Digits") or ""

    # --- media stream (bridge mode) ---------------------------------------------------------------
    # The encoding and rate the gateway asks the carrier to stream (and Ultravox to speak).
    media_encoding: ClassVar[str]  # gateway.media.codecs encoding name
    media_rate: ClassVar[int]
    # Audio sent to the carrier goes in whole frames of this many milliseconds (the rest waits for
    # the next audio); 0: any size.
    media_chunk_ms: ClassVar[int] = 0

    # Whether upgrade_problem proves the carrier sent the socket (then the token may come later).
    upgrade_is_signed: ClassVar[bool] = False
    # Whether the stream URL may carry a query (the media socket's credentials). Carriers that
    # take none get the credentials as stream parameters only, checked on the start message.
    stream_url_takes_query: ClassVar[bool] = True

    def upgrade_problem(self, url: str, headers: Mapping[str, str]) -> str | None:
        """Why the carrier's media-socket upgrade request is not authentic, or None.

        Carriers that sign nothing on the upgrade rely on the gateway's media token alone.
        """
        return None

    # The start message's encoding (lower-cased) when the carrier streams what the gateway asked for.
    media_start_encodings: ClassVar[tuple[str, ...]]

    def stream_format(self, start: StreamStart) -> AudioFormat | None:
        """The audio the carrier streams, from its start message; None when the gateway cannot relay it.

        The Ultravox side always speaks media_rate; a carrier accepting a stream in another format
        or rate (Telnyx's G.711 fallback) returns that, and the bridge transcodes it."""
        if start.encoding.lower() in self.media_start_encodings and start.rate == self.media_rate:
            return AudioFormat(self.media_encoding, self.media_rate)
        return None

    def parse_media(self, message: str | bytes) -> StreamEvent:
        """One message from the carrier's media socket. Raises MalformedFrame, never anything else."""
        try:
            return self._parse_media(message)
        except MalformedFrame:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as error:  # a field of the wrong shape
            raise MalformedFrame(f"unexpected message shape ({type(error).__name__})") from None

    @abstractmethod
    def _parse_media(self, message: str | bytes) -> StreamEvent:
        """One message from the carrier's media socket."""

    # Messages to the carrier: text (JSON) frames, or bytes for carriers whose frames are binary.
    @abstractmethod
    def media_mark(self, stream_id: str, name: str) -> str | bytes:
        """A marker the carrier echoes once the audio sent before it has been played."""

    @abstractmethod
    def media_audio(self, stream_id: str, payload: bytes) -> str | bytes:
        """A message playing `payload` (carrier encoding) to the caller."""

    @abstractmethod
    def media_clear(self, stream_id: str) -> str | bytes:
        """A message dropping every queued, unplayed audio at once (barge-in)."""

    @abstractmethod
    async def hang_up(self, http: httpx.AsyncClient, carrier_call_id: str, *, deadline: float) -> None:
        """End the live call. A call that has already ended counts as success."""

    async def cancel(self, http: httpx.AsyncClient, carrier_call_id: str, *, deadline: float) -> None:
        """Stop an outbound call not answered yet (queued or ringing); one answered meanwhile is
        hung up. A call that has already ended counts as success. Carriers whose hang-up also
        cancels a call that still rings keep this default."""
        await self.hang_up(http, carrier_call_id, deadline=deadline)

    # --- answers --------------------------------------------------------------------------------
    def answer_response(self, body: str) -> Response:
        """The HTTP response carrying an answer."""
        return Response(body, media_type=self.answer_media_type)

    @abstractmethod
    def connect_answer(self, join_url: str, parameters: dict[str, str] | None = None) -> str:
        """The answer (XML, JSON…) that connects the call's audio to a stream URL (Ultravox's join URL, or the gateway's
        media socket); `parameters` go with the stream where the carrier supports stream parameters."""

    @abstractmethod
    def apology_answer(self, message: str, fallback_number: str | None) -> str:
        """An answer that speaks `message`, then dials `fallback_number` if given, then hangs up."""

    @abstractmethod
    def reject_answer(self, message: str) -> str:
        """An answer that politely turns the caller away."""

    # --- the carrier's own side: how `gateway simulate` plays a call as this carrier would ---------
    @abstractmethod
    def simulated_inbound(self, *, from_: str, to: str) -> SimulatedCall:
        """A new inbound call's webhook parameters, as the carrier writes them."""

    @abstractmethod
    def simulated_signature(self, url: str, params: Mapping[str, str], body: bytes,
                            private_key: str | None) -> dict[str, str]:
        """Headers authenticating that webhook as the carrier would, from the gateway's configured secret
        (or `private_key`, where the gateway holds only the public half). Raises ValueError without one."""

    @abstractmethod
    def connected_stream(self, answer: str) -> tuple[str, dict[str, str]] | None:
        """The stream URL a connect answer points the carrier at, and the stream's parameters."""

    def simulated_upgrade_headers(self, url: str) -> dict[str, str]:
        """Headers the carrier sends when it opens the media socket at `url`."""
        return {}

    @abstractmethod
    def simulated_start(self, stream_id: str, call_id: str, parameters: Mapping[str, str]) -> Sequence[str | bytes]:
        """The messages opening the carrier's media stream."""

    @abstractmethod
    def simulated_audio(self, stream_id: str, payload: bytes, sequence: int, timestamp_ms: int) -> str | bytes:
        """The caller's audio (`payload` in the carrier's encoding)."""

    @abstractmethod
    def simulated_mark_played(self, stream_id: str, name: str) -> str | bytes:
        """The carrier telling the gateway the audio before mark `name` has been played."""

    @abstractmethod
    def simulated_stop(self, stream_id: str) -> str | bytes:
        """The caller hanging up."""

    @abstractmethod
    def parse_outgoing(self, message: str | bytes) -> StreamAudio | StreamMark | StreamClear | StreamOther:
        """A message the gateway sent the carrier on the media socket."""
