"""The round state machine: one transition function, the statuses the database accepts, where a
rerun resumes (a failed round at its failed stage), and that a rerun of an earlier stage never
moves a round back."""

from __future__ import annotations

import pytest

from cai.stages.status import STEPS, Event, RoundStatus, Stage, steps_left, transition
from cai.store.models import ROUND_STATUSES

S = RoundStatus


def test_the_enum_is_what_the_database_accepts() -> None:
    assert tuple(S) == ROUND_STATUSES


@pytest.mark.parametrize(
    ("current", "stage", "event", "expected"),
    [
        (S.CREATED, Stage.GENERATE, Event.START, S.GENERATING),
        (S.GENERATING, Stage.GENERATE, Event.START, None),  # already there: no write
        (S.GENERATING, Stage.GENERATE, Event.FINISH, S.GENERATED),
        (S.GENERATED, Stage.GENERATE, Event.START, S.GENERATING),  # sampling more is allowed
        (S.GENERATED, Stage.JUDGE, Event.START, S.JUDGING),
        (S.JUDGING, Stage.JUDGE, Event.FINISH, S.JUDGED),
        (S.JUDGED, Stage.EXPORT, Event.START, None),  # export has no running status
        (S.JUDGED, Stage.EXPORT, Event.FINISH, S.EXPORTED),
        (S.GENERATED, Stage.EXPORT, Event.FINISH, None),  # an unjudged round is not 'exported'
        (S.EXPORTED, Stage.TRAIN, Event.START, S.TRAINING),
        (S.TRAINING, Stage.TRAIN, Event.FINISH, S.TRAINED),
        (S.TRAINED, Stage.EVAL, Event.START, S.EVALUATING),
        (S.EVALUATING, Stage.EVAL, Event.FINISH, S.DONE),
        # A round past a stage stays where it is when that stage runs again, or fails again.
        (S.DONE, Stage.JUDGE, Event.START, None),
        (S.DONE, Stage.JUDGE, Event.FINISH, None),
        (S.EXPORTED, Stage.EXPORT, Event.FINISH, None),
        (S.TRAINED, Stage.JUDGE, Event.FAIL, None),
        (S.JUDGING, Stage.JUDGE, Event.FAIL, S.FAILED),
        (S.TRAINING, Stage.TRAIN, Event.FAIL, S.FAILED),
    ],
)
def test_transitions(current: S, stage: Stage, event: Event, expected: S | None) -> None:
    assert transition(current, stage, event) == expected


def test_a_failed_round_counts_as_being_in_its_failed_stage() -> None:
    assert transition(S.FAILED, Stage.JUDGE, Event.START, Stage.JUDGE) == S.JUDGING
    assert transition(S.FAILED, Stage.EXPORT, Event.START, Stage.EXPORT) == S.JUDGED
    assert transition(S.FAILED, Stage.EXPORT, Event.FINISH, Stage.EXPORT) == S.EXPORTED
    # Running an earlier stage leaves the failure for the stage that failed to clear.
    assert transition(S.FAILED, Stage.GENERATE, Event.START, Stage.TRAIN) is None
    assert transition(S.FAILED, Stage.GENERATE, Event.FAIL, Stage.TRAIN) is None
    assert transition(S.FAILED, Stage.TRAIN, Event.FAIL, Stage.TRAIN) == S.FAILED


def test_steps_left_resume_at_the_stage_a_status_belongs_to() -> None:
    assert steps_left("created") == list(STEPS)
    assert steps_left("generated") == ["judge", "export", "train", "eval"]
    assert steps_left("judged") == ["export", "train", "eval"]
    assert steps_left("trained") == ["eval"]
    assert steps_left("failed", "train") == ["train", "eval"]
    assert steps_left("failed") == list(STEPS)


def test_the_settings_know_every_judge_mode() -> None:
    from cai.judge import MODES
    from cai.stages.settings import JUDGE_MODES

    assert JUDGE_MODES == MODES
