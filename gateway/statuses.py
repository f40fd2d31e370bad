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
REJECTED = "rejected"  # inbound: no route for the called number

# Who picked up an outbound call, as answering-machine detection tells it (the record's answered_by),
# whatever the carrier's own words.
HUMAN = "human"
MACHINE = "machine"  # an answering machine or voicemail
FAX = "fax"
UNKNOWN = "unknown"  # detection could not tell (it timed out)
ANSWERED_BY = (HUMAN, MACHINE, FAX, UNKNOWN)

STATUS_RANK = {QUEUED: 0, CREATING: 0, RINGING: 1, ANSWERED: 2, IN_PROGRESS: 3}
FINAL_STATUSES = {COMPLETED, NO_ANSWER, BUSY, CANCELED, FAILED, MACHINE_DETECTED, REJECTED}
STATUS_RANK.update({status: 9 for status in FINAL_STATUSES})
STATUSES = list(STATUS_RANK)
