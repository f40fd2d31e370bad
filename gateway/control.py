"""The call-control API under /v1/calls/{id}: hang up (or cancel), transfer to an operator, tell the agent.
Same Bearer keys and JSON conventions as the dialer API (gateway.api)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .api import ApiRefusal, call_in_scope, json_body, problem
from .carriers.base import Carrier
from .flows.control import CallConflict, CallControl, Urgency
from .flows.transfer import MAX_REASON, MAX_SUMMARY, Refusal, TransferFlow, TransferOutcome, TransferRequest
from .http import RemoteError
from .logs import bind_call
from .settings import Settings
from .store import CallRecord, CallStore
from .views import CallView, TransferView

MAX_MESSAGE = 4000


class HangupRequest(BaseModel):
    """Body of POST /v1/calls/{id}/hangup: none, or an empty object."""

    model_config = ConfigDict(extra="forbid")


class TransferCallRequest(BaseModel):
    """Body of POST /v1/calls/{id}/transfer."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    operator: str = Field(min_length=1, description="An operator of [operators.*] that the call's route allows")
    kind: Literal["cold", "warm"] = Field(
        default="cold", description="cold: the caller is put through; warm: the caller waits on hold while the "
                                    "operator hears the reason and summary and accepts")
    reason: str = Field(min_length=1, max_length=MAX_REASON, description="Why the caller needs a person")
    summary: str | None = Field(default=None, min_length=1, max_length=MAX_SUMMARY,
                                description="What the operator should know (warm transfers)")

    @model_validator(mode="after")
    def _warm_has_summary(self) -> "TransferCallRequest":
        if self.kind == "warm" and not self.summary:
            raise ValueError("a warm transfer needs a summary for the operator")
        return self


class MessageRequest(BaseModel):
    """Body of POST /v1/calls/{id}/messages: text the agent receives as if the caller had typed it."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_MESSAGE)
    urgency: Urgency | None = Field(
        default=None, description="Ultravox's user_text_message urgency: only immediate may interrupt the agent; "
                                  "soon is Ultravox's default")


class CallControlApi:
    def __init__(self, settings: Settings, store: CallStore, carriers: dict[str, Carrier], control: CallControl,
                 transfer: TransferFlow):
        self.settings = settings
        self.store = store
        self.carriers = carriers
        self.control = control
        self.transfer_flow = transfer

    async def _target(self, request: Request, model: type[BaseModel], *, what: str, optional: bool = False):
        """(the call named in the path, the request body); raises ApiRefusal."""
        body = await json_body(request, model, self.settings.max_body_bytes, what=what, optional=optional)
        record = await call_in_scope(request, self.store)
        if record is None:
            raise ApiRefusal(problem(404, "no such call"))
        bind_call(record)
        return record, body

    async def hangup(self, request: Request) -> Response:
        try:
            record, _ = await self._target(request, HangupRequest, what="the hang-up request", optional=True)
            record = await self.control.hang_up(record)
        except ApiRefusal as refusal:
            return refusal.response
        except CallConflict as conflict:
            return problem(409, conflict.reason)
        except RemoteError as error:
            return problem(502, error.reason)
        return JSONResponse(CallView.of(record))

    async def transfer(self, request: Request) -> Response:
        try:
            record, body = await self._target(request, TransferCallRequest, what="the transfer request")
        except ApiRefusal as refusal:
            return refusal.response
        if record.is_final:
            return problem(409, f"the call has already ended ({record.status})")
        outcome = await self.transfer_flow.begin(record, TransferRequest(
            kind=body.kind, operator=body.operator, reason=body.reason, summary=body.summary))
        if outcome.transfer is None:
            return self._transfer_refused(record, body, outcome)
        return JSONResponse(TransferView.of(outcome.transfer), status_code=202,
                            headers={"Location": f"/v1/calls/{record.id}"})

    def _transfer_refused(self, record: CallRecord, body: TransferCallRequest, outcome: TransferOutcome) -> Response:
        refusal = outcome.refusal
        if refusal is Refusal.NOT_CONNECTED:
            return problem(409, "the call has no answered phone leg the gateway can move (not answered yet, "
                                "or placed by Ultravox)")
        if refusal is Refusal.CARRIER_CANNOT:
            title = self.carriers[record.carrier].title
            return problem(422, f"{title} cannot move a live call: no transfers on {title} calls")
        if refusal is Refusal.UNKNOWN_OPERATOR:
            allowed = ", ".join(outcome.allowed) or "none"
            return problem(422, [{"field": "operator", "problem":
                                  f"{body.operator!r} is not an operator this call's route allows (allowed: {allowed})"}])
        if refusal is Refusal.OPERATOR_CLOSED:
            return problem(409, f"{body.operator} is not available at the moment ({outcome.detail}), "
                                "nor any operator it falls back to")
        if refusal is Refusal.UNDER_WAY:
            return problem(409, "a transfer is already under way for this call")
        return problem(422, f"the transfer needs {outcome.detail}")  # MISSING_DETAILS: the body's rules prevent it

    async def messages(self, request: Request) -> Response:
        try:
            record, body = await self._target(request, MessageRequest, what="the message")
            message = await self.control.tell_agent(record, body.text, body.urgency)
        except ApiRefusal as refusal:
            return refusal.response
        except CallConflict as conflict:
            return problem(409, conflict.reason)
        except RemoteError as error:
            return problem(502, f"Ultravox refused the message: {error.reason}")
        return JSONResponse({"call_id": record.id, "ultravox_call_id": record.ultravox_call_id, "message": message},
                            status_code=202)


# --- its part of /v1/openapi.json ------------------------------------------------------------------------

def openapi_schemas() -> dict[str, Any]:
    models = (HangupRequest, TransferCallRequest, MessageRequest)
    schemas = {model.__name__: model.model_json_schema(ref_template="#/components/schemas/{model}") for model in models}
    schemas["Transfer"] = TransferView.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas["MessageSent"] = {"type": "object", "properties": {
        "call_id": {"type": "string"},
        "ultravox_call_id": {"type": "string"},
        "message": {"type": "object", "description": "the data message sent to the Ultravox call"},
    }}
    return schemas


def openapi_paths() -> dict[str, Any]:
    def json_of(name: str) -> dict[str, Any]:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}

    def route(summary: str, body: str, *, required: bool = True, answer: tuple[str, str, str],
              errors: dict[str, dict[str, str]]) -> dict[str, Any]:
        status, description, schema = answer
        return {"post": {
            "summary": summary,
            "parameters": [{"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": required, "content": json_of(body)},
            "responses": {
                status: {"description": description, "content": json_of(schema)},
                "401": {"description": "missing or unknown API key"},
                "404": {"description": "no such call"},
                "413": {"description": "body larger than the gateway's max_body_bytes"},
                "415": {"description": "the body is not application/json"},
                **errors,
            },
        }}

    return {
        "/v1/calls/{call_id}/hangup": route(
            "End a live call, or cancel an outbound call still queued or ringing (no body, or {})",
            "HangupRequest", required=False,
            answer=("200", "the call as it is now: completed (end_reason hangup-api) or canceled", "Call"),
            errors={
                "409": {"description": "the call has already ended"},
                "422": {"description": "the body has fields (it takes none)"},
                "502": {"description": "the carrier or Ultravox refused; the call goes on"},
            },
        ),
        "/v1/calls/{call_id}/transfer": route(
            "Transfer the caller to an operator, as the agent's transfer tool does", "TransferCallRequest",
            answer=("202", "the transfer, started; GET /v1/calls/{call_id} follows it", "Transfer"),
            errors={
                "409": {"description": "the call has ended or is not answered yet, a transfer is under way, "
                                       "or the operator (and its fallbacks) is closed"},
                "422": {"description": "invalid body, an operator the call's route does not allow (the allowed "
                                       "ones are named), or a carrier that cannot move a live call"},
            },
        ),
        "/v1/calls/{call_id}/messages": route(
            "Tell the agent something: text it receives as a user message (Ultravox data message)",
            "MessageRequest",
            answer=("202", "Ultravox accepted the message for the agent", "MessageSent"),
            errors={
                "409": {"description": "the call has ended, has no agent yet, or its agent is not active"},
                "422": {"description": "invalid body"},
                "502": {"description": "Ultravox refused the message (the reason is given)"},
            },
        ),
    }
