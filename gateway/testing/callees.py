"""The people a campaign phones, played against a fake carrier: each call the fake placed is held
for a while and then ends as the callee's script says (busy, no-answer, completed…), reported with
the carrier's own status callback; with `answer_with`, each call is picked up first, as a person
would (``gateway demo`` runs them so). Counts what a campaign test (or bench/campaign.py) checks:
how often each number was dialled, and the most calls live at once as the carrier saw them."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .carrier import CarrierDouble, FakeCarrier, PlacedCarrierCall


@dataclass
class Callees:
    fake: FakeCarrier
    # The outcomes of a number's calls in turn (the last repeats); default: answered, then completed.
    script: dict[str, list[str]] = field(default_factory=dict)
    hold: Callable[[], float] = lambda: 0.0  # seconds a call stays live before it ends
    seed: int = 0
    # When set, each call is answered as soon as it is seen (this carrier's double picks it up: the
    # answer webhook where the carrier has one), then ends after `hold` as scripted.
    answer_with: CarrierDouble | None = None
    dialled: Counter = field(default_factory=Counter)
    most_live: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._seen = 0
        self._ending: list[tuple[float, PlacedCarrierCall, str]] = []
        self._answered_at: dict[str, float] = {}  # call id -> when it was picked up (answer_with)
        self._thread = threading.Thread(target=self._run, name="callees", daemon=True)
        self._random = random.Random(self.seed)

    def __enter__(self) -> "Callees":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def live(self) -> int:
        return len(self._ending)

    def _run(self) -> None:
        while not self._stop.is_set():
            calls = list(self.fake.calls)
            for call in calls[self._seen:]:
                number = "+" + call.to.lstrip("+")  # in E.164 whichever way the carrier writes it (Plivo: no "+")
                outcomes = self.script.get(number, ["completed"])
                outcome = outcomes[min(self.dialled[number], len(outcomes) - 1)]
                self.dialled[number] += 1
                if self.answer_with is not None:
                    self._pick_up(call)
                self._ending.append((time.monotonic() + self.hold(), call, outcome))
            self._seen = len(calls)
            self.most_live = max(self.most_live, len(self._ending))
            now = time.monotonic()
            due = [entry for entry in self._ending if entry[0] <= now]
            for entry in due:
                self._ending.remove(entry)
                if not self._end(entry[1], entry[2]):
                    self._ending.append((now + 0.5, entry[1], entry[2]))  # told again, like a carrier
            time.sleep(0.01)

    def _pick_up(self, call: PlacedCarrierCall) -> None:
        assert self.answer_with is not None
        try:
            picked = self.answer_with.pick_up(self.fake, call)
        except Exception as error:
            self.errors.append(f"{call.to}: pick-up: {type(error).__name__}: {error}")
            return
        if picked.answer is not None and picked.answer.status_code >= 400:
            self.errors.append(f"{call.to}: the answer webhook got {picked.answer.status_code}")
        self._answered_at[call.call_id] = time.monotonic()

    def _end(self, call: PlacedCarrierCall, outcome: str) -> bool:
        answered_at = self._answered_at.get(call.call_id)
        # A call that was picked up reports how long it lasted, as carriers do.
        extra = {} if self.answer_with is None or answered_at is None else self.answer_with.status_fields(
            outcome, round(time.monotonic() - answered_at))
        try:
            response = self.fake.send_status(call, outcome, **extra)
        except Exception as error:  # a replica killed under it: the balancer sends the next elsewhere
            self.errors.append(f"{call.to}: {type(error).__name__}: {error}")
            return False
        if response.status_code >= 500:
            self.errors.append(f"{call.to}: {outcome} answered {response.status_code}")
            return False
        return True
