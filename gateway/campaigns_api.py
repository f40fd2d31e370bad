"""The campaigns API under /v1/campaigns and the suppression list under /v1/suppressions.
Same Bearer keys and JSON conventions as the dialer API (gateway.api)."""

from __future__ import annotations

import csv
import io
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import inputs, numbers
from .access import ApiAccess, access_of
from .api import ApiRefusal, _limit, _optional_text, json_body, path_text, problem, read_limited
from .flows.campaigns import MAX_CAMPAIGN_LIST, CampaignConflict, CampaignFlow, CampaignRequest
from .flows.outbound import DialRejected
from .settings import Settings
from .store.campaigns import CampaignRecord, CampaignStore, Suppression
from .views import campaign_view, row_view

# Row positions are a 32-bit integer column (PostgreSQL refuses a larger bound: a 500 before).
MAX_POSITION = 2**31 - 1
ROW_STATUSES_DOC = ("pending, dialing, a call's final status (completed, busy, no-answer, failed, machine-detected, "
                    "voicemail-left, canceled), suppressed, rejected (dial policy), expired, canceled")


class SuppressionRequest(BaseModel):
    """Body of POST /v1/suppressions (JSON), or text/csv with a `number` column (or one number a line)."""

    model_config = ConfigDict(extra="forbid")

    numbers: list[str] = Field(min_length=1, max_length=100_000)
    reason: str | None = Field(default=None, max_length=500)

    @field_validator("numbers")
    @classmethod
    def _e164(cls, value: list[str]) -> list[str]:
        return [numbers.e164(number) for number in value]


def suppression_view(entry: Suppression) -> dict[str, Any]:
    return {"number": entry.number, "reason": entry.reason, "source": entry.source,
            "created_at": entry.created_at.isoformat()}


class CampaignsApi:
    def __init__(self, settings: Settings, store: CampaignStore, flow: CampaignFlow):
        self.settings = settings
        self.store = store
        self.flow = flow

    def _sees(self, access: ApiAccess, campaign: CampaignRecord) -> bool:
        """Whether the key's scope covers the campaign (its route, carrier and, own calls only, its creator)."""
        return access.sees_campaign(route=campaign.spec.get("route"),
                                    carrier=campaign.spec.get("carrier") or self.settings.outbound.carrier,
                                    owner_key_id=campaign.api_key_id)

    async def _campaign(self, request: Request) -> CampaignRecord:
        """The campaign in the path; 404 for one outside the key's scope, as for an unknown id."""
        campaign_id = path_text(request, "campaign_id")
        campaign = None if campaign_id is None else await self.store.get(campaign_id)
        if campaign is None or not self._sees(access_of(request), campaign):
            raise ApiRefusal(problem(404, "no such campaign"))
        return campaign

    async def _view(self, campaign: CampaignRecord) -> dict[str, Any]:
        return campaign_view(campaign, await self.store.counts(campaign.id))

    async def create(self, request: Request) -> Response:
        access = access_of(request)
        try:
            body = await json_body(request, CampaignRequest, self.settings.campaigns.max_body_bytes, what="the campaign")
            if refusal := access.dial_refusal(body.route, body.carrier or self.settings.outbound.carrier):
                return problem(403, refusal)
            campaign = await self.flow.create(body, api_key_id=access.key_id)
        except ApiRefusal as refusal:
            return refusal.response
        except DialRejected as rejection:
            return problem(rejection.status, rejection.reason)
        return JSONResponse(await self._view(campaign), status_code=201,
                            headers={"Location": f"/v1/campaigns/{campaign.id}"})

    async def list(self, request: Request) -> Response:
        try:
            limit = min(_limit(request.query_params.get("limit")), MAX_CAMPAIGN_LIST)
        except ValueError as error:
            return problem(400, str(error))
        access = access_of(request)
        # A scoped key's are among the newest MAX_CAMPAIGN_LIST of all.
        found = await self.store.list(limit if access.scope is None else MAX_CAMPAIGN_LIST)
        visible = [campaign for campaign in found if self._sees(access, campaign)][:limit]
        return JSONResponse({"campaigns": [await self._view(c) for c in visible]})

    async def get(self, request: Request) -> Response:
        try:
            return JSONResponse(await self._view(await self._campaign(request)))
        except ApiRefusal as refusal:
            return refusal.response

    async def rows(self, request: Request) -> Response:
        """A page of rows in list order (?status=, ?after=POSITION, ?limit=), or all of them as CSV
        (?format=csv)."""
        query = request.query_params
        try:
            campaign = await self._campaign(request)
            try:
                after = inputs.whole_number(query.get("after", "-1"), name="after", minimum=-1, maximum=MAX_POSITION)
            except inputs.InvalidInput:
                raise ValueError("after must be a row position") from None
            status = _optional_text(query.get("status"), "status")
            if query.get("format") == "csv":
                return await self._csv(campaign, status)
            limit = _limit(query.get("limit"))
        except ApiRefusal as refusal:
            return refusal.response
        except ValueError as error:
            return problem(400, str(error))
        rows = await self.store.rows(campaign.id, status=status, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return JSONResponse({"rows": [row_view(row) for row in rows],
                             "next_after": rows[-1].position if more and rows else None})

    async def _csv(self, campaign: CampaignRecord, status: str | None) -> Response:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["position", "to", "status", "attempts", "call_id", "reason"])
        after = -1
        while True:
            rows = await self.store.rows(campaign.id, status=status, after=after, limit=1000)
            for row in rows:
                writer.writerow([row.position, row.to_number, row.status, row.attempts, row.call_id or "", row.reason or ""])
            if len(rows) < 1000:
                break
            after = rows[-1].position
        return Response(out.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="campaign-{campaign.id}.csv"'})

    async def pause(self, request: Request) -> Response:
        return await self._lifecycle(request, self.flow.pause)

    async def resume(self, request: Request) -> Response:
        return await self._lifecycle(request, self.flow.resume)

    async def cancel(self, request: Request) -> Response:
        return await self._lifecycle(request, self.flow.cancel)

    async def _lifecycle(self, request: Request, change) -> Response:
        try:
            campaign = await change((await self._campaign(request)).id)
        except ApiRefusal as refusal:
            return refusal.response
        except LookupError:
            return problem(404, "no such campaign")
        except CampaignConflict as conflict:
            return problem(409, str(conflict))
        return JSONResponse(await self._view(campaign))

    # --- the suppression list ----------------------------------------------------------------------
    async def suppress(self, request: Request) -> Response:
        try:
            content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if content_type == "text/csv":
                body = await read_limited(request, self.settings.campaigns.max_body_bytes)
                if body is None:
                    return problem(413, "body too large ([campaigns] max_body_bytes)")
                entry = SuppressionRequest(numbers=numbers_from_csv(body.decode("utf-8-sig")),
                                           reason=_optional_text(request.query_params.get("reason"), "reason"))
                source = "import"
            else:
                entry = await json_body(request, SuppressionRequest, self.settings.campaigns.max_body_bytes,
                                        what="the numbers")
                source = "api"
        except ApiRefusal as refusal:
            return refusal.response
        except ValueError as error:
            return problem(422, str(error))
        added = await self.store.suppress(entry.numbers, reason=entry.reason, source=source)
        return JSONResponse({"added": added, "numbers": len(set(entry.numbers))}, status_code=201)

    async def suppressions(self, request: Request) -> Response:
        try:
            limit = _limit(request.query_params.get("limit"))
            after = _optional_text(request.query_params.get("after"), "after")
        except ValueError as error:
            return problem(400, str(error))
        found = await self.store.suppressions(after=after, limit=limit + 1)
        more = len(found) > limit
        found = found[:limit]
        return JSONResponse({"suppressions": [suppression_view(entry) for entry in found],
                             "next_after": found[-1].number if more and found else None})

    async def unsuppress(self, request: Request) -> Response:
        number = path_text(request, "number")
        if number is None or not await self.store.unsuppress(number):
            return problem(404, "the number is not on the suppression list")
        return Response(status_code=204)


def numbers_from_csv(text: str) -> list[str]:
    """A `number` column (with a header line), or one number a line."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    if "number" in [cell.strip().lower() for cell in next(csv.reader([lines[0]]))]:
        return [row["number"].strip() for row in csv.DictReader(io.StringIO("\n".join(lines)),
                                                                 skipinitialspace=True) if row.get("number")]
    return [next(csv.reader([line]))[0].strip() for line in lines]


def openapi_paths() -> dict[str, Any]:
    """/v1/openapi.json's entries for these routes."""
    campaign_id = {"name": "campaign_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/CampaignRequest"}}}
    unknown = {"description": "no such campaign"}
    lifecycle = {action: {"post": {
        "summary": summary, "parameters": [campaign_id],
        "responses": {"200": {"description": "the campaign as it is now"}, "404": unknown,
                      "409": {"description": "not allowed from the campaign's status"}},
    }} for action, summary in (("pause", "Dial no more rows until resumed (live calls go on)"),
                               ("resume", "Dial again"), ("cancel", "Dial no more rows, ever: pending rows are canceled"))}
    return {
        "/v1/campaigns": {
            "post": {"summary": "Start a campaign: rows dialled within the window, concurrency, rate and retries",
                     "requestBody": {"required": True, "content": ref},
                     "responses": {"201": {"description": "the campaign with its counts by row status"},
                                   "403": {"description": "a from number is not the deployment's"},
                                   "413": {"description": "too many rows or too large a body"},
                                   "422": {"description": "invalid request, or the dial policy refuses the campaign"}}},
            "get": {"summary": "Campaigns, newest first", "responses": {"200": {"description": "campaigns"}}},
        },
        "/v1/campaigns/{campaign_id}": {"get": {"summary": "One campaign with its counts by row status",
                                                "parameters": [campaign_id],
                                                "responses": {"200": {"description": "the campaign"}, "404": unknown}}},
        "/v1/campaigns/{campaign_id}/rows": {"get": {
            "summary": f"Rows in list order; statuses: {ROW_STATUSES_DOC}",
            "parameters": [campaign_id, *[{"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                                          for name in ("status", "after", "limit", "format")]],
            "responses": {"200": {"description": "a page of rows (JSON), or all rows as text/csv with format=csv"},
                          "404": unknown}}},
        **{f"/v1/campaigns/{{campaign_id}}/{action}": entry for action, entry in lifecycle.items()},
        "/v1/suppressions": {
            "post": {"summary": "Numbers never to dial (JSON, or text/csv to import)",
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": {"$ref": "#/components/schemas/SuppressionRequest"}},
                         "text/csv": {"schema": {"type": "string"}}}},
                     "responses": {"201": {"description": "how many were added"}}},
            "get": {"summary": "The suppression list, by number", "responses": {"200": {"description": "a page"}}},
        },
        "/v1/suppressions/{number}": {"delete": {
            "summary": "Take a number off the suppression list",
            "parameters": [{"name": "number", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"204": {"description": "removed"}, "404": {"description": "not listed"}}}},
    }


def openapi_schemas() -> dict[str, Any]:
    schemas = {}
    for model in (CampaignRequest, SuppressionRequest):
        schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas
