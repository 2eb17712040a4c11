#!/usr/bin/env bash
# The loop's first steps, offline, on a fresh SQLite database in ./demo: register the shipped
# constitution and prompt set, start a round, sample pairs from the embedded SmolLM2-135M, judge
# them in-process (both orders), and export a snapshot for TRL. Kept small: the in-process judge
# is slow on a CPU and, at 135M parameters, not a trustworthy one (cai says so when it runs).
# (`cai demo` will run the whole loop, training included.)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cai="$repo/.venv/bin/cai"
mkdir -p "$repo/demo"
cd "$repo/demo"
rm -rf cai.db cai.db-wal cai.db-shm snapshots

"$cai" db upgrade
"$cai" constitution validate "$repo"/constitutions/*/v*.yaml
"$cai" constitution register "$repo/constitutions/helpful-harmless/v1.yaml"
"$cai" prompts import "$repo/prompt_sets/helpful-harmless.jsonl"
"$cai" templates check
round_id=$("$cai" round start --constitution helpful-harmless@1)
"$cai" generate --round "$round_id" --limit 3 --samples 2 --max-new-tokens 48
"$cai" judge --round "$round_id" --max-tokens 48 --concurrency 1
# The 135M judge often contradicts itself across the two orders (an inconsistent tie), and ties
# are not exported; say so rather than fail.
"$cai" export --round "$round_id" --eval-fraction 0 ||
  echo "(no snapshot: the embedded judge separated none of these pairs in both orders)"
"$cai" round show "$round_id"
echo "next: point --judge-base-url at a capable model, run 'cai judge calibrate', then 'cai train --round $round_id'"
