"""Label quality of principle ensembles and soft labels, on the shipped gold set (48 pairs under
helpful-harmless@1), with the loopback judge made to prefer the better response with a known
probability q (tests/fake_openai.py `knows_better`: a calibrated judge whose belief per request
is drawn around q, reported as the verdict's logprobs).

For each q it runs `cai.calibrate.calibrate` with K = 5 principles a pair and prints, for the
labels made from the first k = 1..5 principles: accuracy (ties count as not right), the share
labelled the wrong way round, flip rate (every principle's two orders disagreed), mean confidence when the label was right and when it was wrong, and the Brier score
of the soft label (the probability of the better response) beside the hard one (1 / 0.5 / 0).
k = 1 is a single principle's label, made as cai always made it: its two orders must agree, and
opposite verdicts are a tie (no wrong label, but no label); k > 1 takes the mean probability.

    python bench/ensembles.py [--accuracy 0.6 0.7 0.8] [--principles 5] [--spread 1.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cai.backends.openai_compat import OpenAIChat  # noqa: E402
from cai.calibrate import calibrate, default_canaries, default_gold, load_pairs  # noqa: E402
from cai.constitution import load_constitution  # noqa: E402
from cai.judging import JudgeOptions  # noqa: E402
from cai.templates import TemplateSet  # noqa: E402
from tests import fake_openai as fake  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accuracy", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    parser.add_argument("--principles", type=int, default=5)
    parser.add_argument("--spread", type=float, default=1.5, help="sd of the judge's belief, in logits")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()

    constitution = load_constitution(REPO / "constitutions/helpful-harmless/v1.yaml").constitution
    gold = load_pairs(default_gold(), "better", "worse", constitution)
    canaries = load_pairs(default_canaries(), "clean", "injected", constitution)
    better = {p.better for p in gold + canaries}
    rows = []
    for q in args.accuracy:
        with fake.FakeOpenAI(fake.knows_better(better, q, args.spread)) as server:
            backend = OpenAIChat(server.base_url, "fake-judge")
            report = asyncio.run(
                calibrate(
                    backend,
                    TemplateSet(),
                    constitution,
                    gold,
                    canaries,
                    JudgeOptions(concurrency=8),
                    principles_per_pair=args.principles,
                )
            )
        rows += [{"q": q} | row for row in report.by_principles]
    if args.json:
        print(json.dumps(rows, indent=2))
        return

    def show(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"{len(gold)} gold pairs, judge accuracy q per request, K up to {args.principles}")
    print("   q  k  accuracy  wrong  flip rate  conf right  conf wrong  Brier soft  Brier hard")
    for r in rows:
        print(
            f"{r['q']:4.2f} {r['k']:2d}  {show(r['accuracy']):>8}  {show(r['wrong_rate']):>5}  {show(r['flip_rate']):>9}  "
            f"{show(r['confidence_when_right']):>10}  {show(r['confidence_when_wrong']):>10}  "
            f"{show(r['brier_soft']):>10}  {show(r['brier_hard']):>10}"
        )


if __name__ == "__main__":
    main()
