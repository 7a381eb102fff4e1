"""What a step, a deploy and a request come to: the words shared by the pipeline, recovery, the runner and the socket.

They are Enums of strings (`StrEnum`) because they travel as text: into the journal (`MAINTD_RESULT=ok`), JSON log
lines, `history.jsonl` and `maintctl --json`. Declaring them once keeps every reader and writer spelling them alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from .steps import Fault


class StepResult(StrEnum):
    """`MAINTD_RESULT` of contract §5, for one step and for a whole deploy."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"
    ROLLED_BACK = "rolled_back"


class DeployKind(StrEnum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    RECOVERY = "recovery"  # finishing or undoing, at start-up, a deploy that a crash cut off


UPLOAD_ACTOR = "upload"  # `MAINTD_ACTOR` of the deploys an upload starts; otherwise the socket peer's user


class Refused(Exception):
    """A request maintd will not carry out; the message is a sentence for the operator."""


class Skipped(Exception):
    """The step does not apply to this deploy; the message says why."""


class StepFailed(Exception):
    """A step failed; `output` holds what a command printed, for the log; `fault` says whose fault it is where the
    step's own default (`Step.blames`) would say wrong."""

    def __init__(self, message: str, output: str = "", fault: Fault | None = None) -> None:
        super().__init__(message)
        self.output = output
        self.fault = fault


class Interrupted(Exception):
    """The daemon stops while a cluster member waits (for etcd, for the others): the deploy ends here, neither
    undone nor closed, and recovery at the next start obeys the switch's decision. The message says what it left."""


@dataclass(frozen=True)
class StepRecord:
    step: str
    result: StepResult
    duration_ms: float
    message: str


@dataclass
class Outcome:
    deploy_id: str
    kind: DeployKind
    release: str
    previous: str | None
    actor: str
    result: StepResult  # ok, failed or rolled_back
    started: str
    duration_ms: float
    error: str = ""
    steps: list[StepRecord] = field(default_factory=list)
    fault: Fault | None = None  # whose fault a failure was: only the release's marks it bad
    switch_id: str | None = None  # in a cluster: the switch it was part of, as recorded in etcd
    strategy: str | None = None  # and how that switch went ("together", "rolling"), once go chose it
    # Milliseconds from the moment the deploy began raising its own maintenance flags to the moment the last of them
    # was lowered (by `maintenance_off`, or by the way back): the window visitors saw the 503 page. None when it
    # raised none (maintenance.when, a rolling switch, an operator's maintenance carried across) or left them up.
    window_ms: float | None = None

    @property
    def went_live(self) -> bool:
        return self.result is StepResult.OK

    def as_json(self) -> dict[str, Any]:
        return asdict(self)
