"""The numbers `cai audit stats`, the stats page and /api/v1/audit/stats report: the judge per
principle and overall (with judge-human agreement and kappa), each judge's latest calibration,
and how far the humans agree with each other."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from cai.audit import HumanAgreement, PrincipleStats, principle_stats
from cai.store import repo
from cai.store.annotators import agreement_between_humans
from cai.store.audit import JudgeCalibration, PairFilters, judge_calibrations, list_pairs


@dataclass(frozen=True)
class AuditStats:
    round_id: int | None
    """None: over every round."""
    principles: list[PrincipleStats]
    overall: PrincipleStats
    judges: list[JudgeCalibration]
    humans: HumanAgreement


def audit_stats(session: Session, round_id: int | None) -> AuditStats:
    if round_id is not None:
        repo.get_round(session, round_id)  # NotFound for an unknown round
    pairs, _ = list_pairs(session, PairFilters(round_id=round_id))
    rows = principle_stats(pairs)
    return AuditStats(
        round_id=round_id,
        principles=rows[:-1],
        overall=rows[-1],
        judges=judge_calibrations(session, round_id),
        humans=agreement_between_humans(session, round_id),
    )
