"""Scripted imports: timed phases that the simulator plays back.

A script is a list of phases sorted by start time (simulated seconds). Counts
move linearly from ``completed`` to ``completed_to`` over a phase.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Phase:
    at: float
    status: str
    """Elevate status, Zilliant status or Rocket.Chat step."""
    reason: str | None = None
    total: int = 0
    completed: int = 0
    completed_to: int | None = None
    errors_per_1000: int = 0


@dataclass(frozen=True, slots=True)
class Moment:
    """Where a script stands at one point in time."""

    phase: Phase
    index: int
    completed: int
    errors: int
    started_at: float | None
    """Simulated second the import started running (first non-waiting phase)."""
    ended_at: float | None


@dataclass
class Script:
    phases: list[Phase]
    running_statuses: frozenset[str] = frozenset()
    final_statuses: frozenset[str] = frozenset()
    _starts: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.phases.sort(key=lambda p: p.at)
        self._starts = [p.at for p in self.phases]

    def at(self, elapsed: float) -> Moment | None:
        """The moment at ``elapsed`` simulated seconds; None before the first phase."""
        index = bisect.bisect_right(self._starts, elapsed) - 1
        if index < 0:
            return None
        phase = self.phases[index]
        completed = phase.completed
        if phase.completed_to is not None and index + 1 < len(self.phases):
            span = self.phases[index + 1].at - phase.at
            fraction = min(1.0, (elapsed - phase.at) / span) if span > 0 else 1.0
            completed = round(phase.completed + (phase.completed_to - phase.completed) * fraction)
        started = next(
            (p.at for p in self.phases[: index + 1] if p.status in self.running_statuses), None
        )
        ended = phase.at if phase.status in self.final_statuses else None
        return Moment(
            phase=phase,
            index=index,
            completed=completed,
            errors=completed * phase.errors_per_1000 // 1000,
            started_at=started,
            ended_at=ended,
        )


ELEVATE_RUNNING = frozenset({"IN_PROGRESS"})
ELEVATE_FINAL = frozenset({"SUCCESS", "FAILURE", "ABORTED"})
ZILLIANT_RUNNING = frozenset({"RUNNING"})
ZILLIANT_FINAL = frozenset({"SUCCEEDED", "FAILED"})
ROCKETCHAT_RUNNING = frozenset(
    {"importer_preparing_started", "importer_importing_started", "importer_importing_messages"}
)
ROCKETCHAT_FINAL = frozenset(
    {"importer_done", "importer_import_failed", "importer_import_cancelled"}
)


SALESFORCE_BULK_RUNNING = frozenset({"InProgress"})
SALESFORCE_BULK_FINAL = frozenset({"JobComplete", "Failed", "Aborted"})
SHOPIFY_RUNNING = frozenset({"RUNNING", "CANCELING"})
SHOPIFY_FINAL = frozenset({"COMPLETED", "FAILED", "CANCELED", "EXPIRED"})


def salesforce_bulk(*phases: Phase) -> Script:
    return Script(list(phases), SALESFORCE_BULK_RUNNING, SALESFORCE_BULK_FINAL)


def shopify(*phases: Phase) -> Script:
    return Script(list(phases), SHOPIFY_RUNNING, SHOPIFY_FINAL)


def elevate(*phases: Phase) -> Script:
    return Script(list(phases), ELEVATE_RUNNING, ELEVATE_FINAL)


def zilliant(*phases: Phase) -> Script:
    return Script(list(phases), ZILLIANT_RUNNING, ZILLIANT_FINAL)


def rocketchat(*phases: Phase) -> Script:
    return Script(list(phases), ROCKETCHAT_RUNNING, ROCKETCHAT_FINAL)


@dataclass
class Scenarios:
    elevate: dict[str, Script]
    zilliant: dict[str, Script]
    zilliant_stop_null: set[str]
    """Zilliant ids whose running answers carry ``"stopDate": null`` (others omit it)."""
    rocketchat: Script | None
    rocketchat_cycle: float | None
    """A new Rocket.Chat import starts every this many simulated seconds."""
    unreadable: set[str] = field(default_factory=set)
    """Elevate and Zilliant ids whose status is answered by a proxy's HTML
    error page (200, text/html): imports that can never be read."""
    walk_ins: dict[str, Script] = field(default_factory=dict)
    """Elevate ids the demo does not configure, for trying the registration
    API: each script starts when the id is first asked about."""
    salesforce_bulk: dict[str, Script] = field(default_factory=dict)
    """Salesforce Bulk API 2.0 ingest jobs by job id (``reason``: errorMessage,
    counts: numberRecordsProcessed, failures: numberRecordsFailed)."""
    shopify: dict[str, Script] = field(default_factory=dict)
    """Shopify bulk operations by the number in ``gid://shopify/BulkOperation/N``
    (``reason``: errorCode, counts: objectCount)."""


DEMO_STORY_SECONDS = 15.0
"""Every configured Elevate and Zilliant import of the demo reaches its final
state within this many simulated seconds (with the poll that sees it)."""


def demo_scenarios() -> Scenarios:
    """The scripted imports of the demo; the demo config watches exactly these
    ids (and ``walk_ins``, for the registration API, which it does not)."""
    total = 5000
    return Scenarios(
        elevate={
            # nightly catalogue: waits, runs, succeeds
            "1001": elevate(Phase(0, "WAITING"), Phase(4, "IN_PROGRESS"), Phase(12, "SUCCESS")),
            # price feed: fails with a reason
            "1002": elevate(
                Phase(0, "IN_PROGRESS"),
                Phase(
                    8,
                    "FAILURE",
                    "Validation failed: 12 products reference unknown category 'shoes-xl'",
                ),
            ),
            # stock levels: blocked for ever
            "1003": elevate(Phase(0, "BLOCKED", "Waiting for import 1001 to finish")),
            # stuck promotions: running for ever
            "1004": elevate(Phase(0, "IN_PROGRESS")),
            # cancelled import
            "1005": elevate(Phase(0, "IN_PROGRESS"), Phase(6, "ABORTED", "Aborted by user")),
        },
        zilliant={
            "2587c81c-b9fc-4873-ae2f-421b292d2c2b": zilliant(
                Phase(0, "RUNNING"), Phase(10, "SUCCEEDED")
            ),
            "7c9e6679-7425-40de-944b-e07fc1f69e29": zilliant(Phase(0, "RUNNING")),
            # The docs' own failed example carries this malformed UUID.
            "2587c81c-bs9fc-4873-ae2f-421b292d2c2b": zilliant(Phase(0, "FAILED")),
        },
        zilliant_stop_null={"7c9e6679-7425-40de-944b-e07fc1f69e29"},
        rocketchat=rocketchat(
            Phase(0, "importer_new"),
            Phase(1, "importer_preparing_started"),
            Phase(2, "importer_preparing_users", total=1200),
            Phase(3, "importer_preparing_channels", total=2600),
            Phase(4, "importer_preparing_messages", total=total),
            Phase(5, "importer_user_selection", total=total),
            Phase(6, "importer_importing_started", total=total),
            Phase(7, "importer_importing_users", total=total, completed=0, completed_to=300),
            Phase(9, "importer_importing_channels", total=total, completed=300, completed_to=600),
            Phase(
                11,
                "importer_importing_messages",
                total=total,
                completed=600,
                completed_to=total,
                errors_per_1000=2,
            ),
            Phase(131, "importer_finishing", total=total, completed=total, errors_per_1000=2),
            Phase(136, "importer_done", total=total, completed=total, errors_per_1000=2),
        ),
        rocketchat_cycle=200.0,
        # behind a broken proxy: never readable
        unreadable={"1006"},
        salesforce_bulk={
            # an Account upsert: uploaded, processed, 3 rows in 1000 rejected
            "7505e00000AbCdEAAZ": salesforce_bulk(
                Phase(0, "UploadComplete", total=4000),
                Phase(
                    3, "InProgress", total=4000, completed=0, completed_to=4000, errors_per_1000=3
                ),
                Phase(12, "JobComplete", total=4000, completed=4000, errors_per_1000=3),
            ),
            # a Contact insert whose CSV was rejected
            "7505e00000AbCdFAAZ": salesforce_bulk(
                Phase(0, "InProgress"),
                Phase(6, "Failed", "InvalidBatch : Field name not found : Emial"),
            ),
        },
        shopify={
            # a product export: created, runs, completes
            "4123456789": shopify(
                Phase(0, "CREATED"),
                Phase(2, "RUNNING", completed=0, completed_to=25_000),
                Phase(11, "COMPLETED", completed=25_000),
            ),
            # an order export that runs into missing scopes
            "4123456790": shopify(Phase(0, "RUNNING"), Phase(5, "FAILED", "ACCESS_DENIED")),
        },
        walk_ins={
            # Register one of these through the API and watch it move.
            "5001": elevate(Phase(0, "WAITING"), Phase(10, "IN_PROGRESS"), Phase(30, "SUCCESS")),
            "5002": elevate(
                Phase(0, "WAITING"),
                Phase(10, "IN_PROGRESS"),
                Phase(30, "FAILURE", "Validation failed: 3 products have no price"),
            ),
        },
    )
