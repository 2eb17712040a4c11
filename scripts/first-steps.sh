#!/usr/bin/env bash
# The loop's first steps on a fresh SQLite database in ./demo: register the shipped constitution,
# import the shipped prompt set, start a round and show it. (`cai demo` will run the whole loop.)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cai="$repo/.venv/bin/cai"
mkdir -p "$repo/demo"
cd "$repo/demo"
rm -f cai.db cai.db-wal cai.db-shm

"$cai" db upgrade
"$cai" constitution validate "$repo"/constitutions/*/v*.yaml
"$cai" constitution register "$repo/constitutions/helpful-harmless/v1.yaml"
"$cai" prompts import "$repo/prompt_sets/helpful-harmless.jsonl"
"$cai" templates check
round_id=$("$cai" round start --constitution helpful-harmless@1)
"$cai" round show "$round_id"
