"""The eval stage: the round's trained policy p_{r+1} against its starting policy p_r on the
held-out prompts (same seeds), judged in both orders by the round's judge, rule-checked, tallied
and stored. Every step is stored as it finishes, so a rerun resumes."""

from __future__ import annotations

from dataclasses import asdict

from cai.backends.base import Sampler
from cai.constitution import parse_ref
from cai.evaluate import EvaluationResult, length_controlled, pair_up, policy_metrics, tally
from cai.generate import sample_missing
from cai.judge_round import Claimant, judge_evaluation
from cai.stages.judge import check_reachable, open_judge, progress_runner, with_judge
from cai.stages.progress import Progress, Silent, Stopped
from cai.stages.settings import EvalSettings
from cai.stages.status import Event, Stage, advance, failure_recorded
from cai.store import evaluation, judges, labels, queue, repo
from cai.store.samples import EVAL_KIND
from cai.workspace import Workspace


def run_eval(
    ws: Workspace, round_id: int, settings: EvalSettings, progress: Progress | None = None
) -> EvaluationResult:
    """Sample both policies on the eval prompts, pair them, judge, tally and store the result;
    the round is `done` once no eval judgment is pending."""
    progress = progress or Silent()
    with ws.session() as session:  # refuse bad input before any model loads
        round_ = repo.get_round(session, round_id)
        contest = evaluation.contest(session, round_id)
        prompts = evaluation.eval_prompts(session, round_id, settings.limit)
        constitution = repo.get_constitution(session, *parse_ref(round_.constitution)).constitution
    judge = open_judge(ws, settings, progress)
    with ws.session() as session:
        advance(session, round_id, Stage.EVAL, Event.START)
    seed = int(round_.config.get("seed", 0))
    sampled = 0
    with failure_recorded(ws, round_id, Stage.EVAL):
        for contestant in (contest.candidate, contest.baseline):

            def make_sampler(who: evaluation.Contestant = contestant) -> Sampler:
                return ws.sampler(who.name, who.model_ref, settings)

            progress.task(f"round {round_id} eval: sampling {contestant.name}")
            # Same seeds for both policies: the comparison sees their difference, not sampling luck.
            sampled += sample_missing(
                ws,
                round_id,
                contestant.id,
                make_sampler,
                prompts,
                settings.samples,
                seed,
                settings.params(),
                settings.batch_size,
                progress,
                origin=EVAL_KIND,
            )[0]
        with ws.session() as session:
            repo.lock_round(session, round_id)
            identical = pair_up(session, round_id, contest, prompts, settings.samples)
        judged = with_judge(
            judge,
            lambda: judge_evaluation(
                ws.engine,
                round_id,
                judge.spec,
                judge.backend,
                judge.templates,
                ws.leased(settings.options()),
                Claimant(ws.worker_id, progress.stop_requested),
                progress_runner(progress, round_id),
            ),
        )
        check_reachable(judged.stats, "eval requests")
        if judged.stats.stopped_on_request:
            raise Stopped(f"round {round_id}: eval judging stopped on request")
        with ws.session() as session:
            judge_id = judges.ensure_judge(session, judge.spec.config("pairwise", judge.templates))
            rules_judge_id = judges.ensure_judge(session, judges.RULES_JUDGE)
            pairs = evaluation.judged_eval_pairs(session, round_id, judge_id, rules_judge_id)
            has_llm = any(p.kind == "llm" for p in constitution.principles)
            outcome = tally(pairs, identical, has_llm, labels.judge_label_policy(session, judge_id).band)
            differences = {pair.pair_id: pair.length_difference for pair in pairs}
            # Identical answers are ties at no length difference.
            results = [(y, differences[pid]) for pid, y in outcome.outcomes.items()] + [(0.5, 0)] * identical
            controlled = length_controlled(results)
            metrics = {
                "samples_per_prompt": settings.samples,
                "eval_prompts": len(prompts),
                "undecided": outcome.undecided,
                "judge_only": outcome.judge,
                "length_controlled": asdict(controlled) if controlled else None,
            }
            for side, contestant in (("candidate", contest.candidate), ("baseline", contest.baseline)):
                answers = evaluation.eval_responses(session, round_id, contestant.id)
                metrics[side] = {"policy": contestant.name} | policy_metrics(
                    constitution, [a.text for a in answers], [a.completion_tokens for a in answers]
                )
            evaluation.save_evaluation(
                session,
                round_id,
                contest,
                judge_id,
                outcome.decided,
                outcome.wins,
                outcome.ties,
                outcome.losses,
                metrics,
            )
            pending = queue.pending_count(session, round_id, judge_id, evaluation=True)
            if pending == 0 and not judged.stats.stopped_by_budget:
                advance(session, round_id, Stage.EVAL, Event.FINISH)
            record = evaluation.latest_evaluation(session, round_id)
    assert record is not None
    return EvaluationResult(record, outcome, sampled, judged.planned)
