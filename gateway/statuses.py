"""The statuses a call goes through, inbound and outbound, and their order."""

# Call statuses, inbound and outbound, in the order a call goes through them.
QUEUED = "queued"  # outbound: accepted, being placed
CREATING = "creating"  # inbound: the Ultravox call is being created for this carrier call
RINGING = "ringing"
ANSWERED = "answered"  # outbound: the callee picked up; the agent is being connected
IN_PROGRESS = "in-progress"  # the caller or callee is talking with the agent
COMPLETED = "completed"
NO_ANSWER = "no-answer"
BUSY = "busy"
CANCELED = "canceled"
FAILED = "failed"  # inbound: the caller got the apology; outbound: could not be placed or connected
MACHINE_DETECTED = "machine-detected"
# Outbound: an answering machine took the call and a message is being left on it (the carrier's,
# or the agent's); outranks the other final statuses, as what the call came to over how it ended.
VOICEMAIL_LEFT = "voicemail-left"
REJECTED = "rejected"  # inbound: no route for the called number

# Who picked up an outbound call, as answering-machine detection tells it (the record's answered_by),
# whatever the carrier's own words.
HUMAN = "human"
MACHINE = "machine"  # an answering machine or voicemail
FAX = "fax"
UNKNOWN = "unknown"  # detection could not tell (it timed out)
ANSWERED_BY = (HUMAN, MACHINE, FAX, UNKNOWN)

STATUS_RANK = {QUEUED: 0, CREATING: 0, RINGING: 1, ANSWERED: 2, IN_PROGRESS: 3}
FINAL_STATUSES = {COMPLETED, NO_ANSWER, BUSY, CANCELED, FAILED, MACHINE_DETECTED, REJECTED, VOICEMAIL_LEFT}
STATUS_RANK.update({status: 9 for status in FINAL_STATUSES})
# The message follows machine-detected (the gateway's own verdict) and comes before the carrier's
# and Ultravox's ends of the call (completed): each of those may arrive first.
STATUS_RANK[VOICEMAIL_LEFT] = 10
STATUSES = list(STATUS_RANK)


def is_answered(status: str) -> bool:
    """Whether a call in `status` was picked up (and may still be going on)."""
    return STATUS_RANK[status] >= STATUS_RANK[ANSWERED]
