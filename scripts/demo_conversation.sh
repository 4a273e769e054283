#!/usr/bin/env bash
# The end of `make demo`: start the bridge server on the built roster, as a game would, and hold a short scripted
# conversation with two NPCs through it (the terminal chat client connects over TCP like an engine plugin).
set -euo pipefail
dist=${1:-dist}
bin=${BIN:-.venv/bin}
ready=$(mktemp -u /tmp/npcforge-ready.XXXXXX.json)
"$bin/npcforge" serve "$dist" --port 0 --ready-file "$ready" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do [ -s "$ready" ] && break; kill -0 $server || exit 1; sleep 0.2; done
port=$("$bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["tcp"]["port"])' "$ready")
first=${2:-magda}
second=${3:-rosie}
echo "== scripted conversation through the bridge at 127.0.0.1:$port =="
printf '%s\n' \
  "Good day! What do you make here?" \
  "Have you heard anything about the missing caravan?" \
  "/switch $second" \
  "I'm hungry and tired. What can you offer me?" \
  "/quit" |
  "$bin/npcforge" chat --connect "127.0.0.1:$port" --max-tokens 60 --seed 7 "$first"
