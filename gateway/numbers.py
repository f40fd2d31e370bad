"""Phone numbers: every decision about one goes through here, on top of the `phonenumbers` library."""

from __future__ import annotations

import re

import phonenumbers
from pydantic.json_schema import JsonDict

# A prefix of an E.164 number, for dial-policy lists ("+1", "+4420"): no library models these.
# ASCII digits only (`\d` would take any script's, and `$` a trailing newline).
_PREFIX = re.compile(r"\+[1-9][0-9]{0,14}")
_SIP = re.compile(r"sips?:[^@\s]+@[^\s]+")


# E.164 as the API documents it (its OpenAPI document's `pattern`); e164() below decides.
E164_PATTERN = r"^\+[1-9][0-9]{1,14}$"
E164_SCHEMA: JsonDict = {"pattern": E164_PATTERN, "examples": ["+15551234567"]}


class InvalidNumber(ValueError):
    pass


def e164(text: str) -> str:
    """`text` as an E.164 number, or InvalidNumber. Written in E.164 already; only its form is checked,
    so test and fictional ranges (+1555…) are accepted, unlike phonenumbers' is_valid_number."""
    if not isinstance(text, str) or not text.startswith("+"):
        raise InvalidNumber(f"must be an E.164 number like +15551234567, got {text!r}")
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        raise InvalidNumber(f"must be an E.164 number like +15551234567, got {text!r}") from None
    formatted = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if formatted != text or not phonenumbers.is_possible_number(parsed):
        raise InvalidNumber(f"must be an E.164 number like +15551234567, got {text!r}")
    return formatted


# Number types that bill the caller more than a call: refused by the dial policy unless allowed.
_COSTLY_TYPES = {
    phonenumbers.PhoneNumberType.PREMIUM_RATE: ("premium-rate", "allow_premium_rate"),
    phonenumbers.PhoneNumberType.SHARED_COST: ("shared-cost", "allow_shared_cost"),
}


def costly_refusal(number: str, *, allow_premium_rate: bool, allow_shared_cost: bool) -> str | None:
    """Why the dial policy refuses E.164 `number` for its type (phonenumbers' metadata: premium-rate,
    shared-cost), or None. The one decision for dial requests, campaign rows and operators alike."""
    try:
        kind = phonenumbers.number_type(phonenumbers.parse(number, None))
    except phonenumbers.NumberParseException:
        return None  # not a phone number (a SIP URI): its type is not the phone network's to say
    described = _COSTLY_TYPES.get(kind)
    if described is None:
        return None
    name, setting = described
    allowed = {"allow_premium_rate": allow_premium_rate, "allow_shared_cost": allow_shared_cost}[setting]
    return None if allowed else f"{number} is a {name} number ([outbound.policy] {setting} = true allows it)"


def is_e164(text: str) -> bool:
    try:
        e164(text)
    except InvalidNumber:
        return False
    return True


def from_carrier(text: str, default_region: str | None) -> str:
    """A number as a carrier sent it, in E.164 where it is a phone number at all.

    Carriers write numbers as "+15551230001", "15551230001" (Plivo: digits with the country code)
    or "08047491899" (Exotel: national format, read in `default_region`). SIP URIs, client names
    and withheld callers ("anonymous", "") stay as they were sent.
    """
    text = text.strip()
    if not re.fullmatch(r"\+?\d[\d\s().-]*", text):
        return text
    if text.startswith("+") or default_region is None:
        candidate, region = "+" + text.lstrip("+"), None
    else:
        candidate, region = text, default_region
    try:
        parsed = phonenumbers.parse(candidate, region)
    except phonenumbers.NumberParseException:
        return text
    if not phonenumbers.is_possible_number(parsed):
        return text
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def national(number: str, region: str) -> str:
    """An E.164 number of `region` in its national dialling form, digits only ("+918047491899" ->
    "08047491899" in IN); numbers of other countries stay in E.164."""
    parsed = phonenumbers.parse(number, None)
    if phonenumbers.region_code_for_number(parsed) != region:
        return number
    formatted = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
    return re.sub(r"\D", "", formatted)


def prefix(text: str) -> str:
    if not isinstance(text, str) or not _PREFIX.fullmatch(text):
        raise InvalidNumber(f"prefixes look like +1 or +4420, got {text!r}")
    return text


def sip_uri(text: str) -> str:
    if not _SIP.fullmatch(text):
        raise InvalidNumber(f"must be a SIP URI like sip:desk@pbx.example.com, got {text!r}")
    return text
