#!/usr/bin/env bash
# The first run: install the requirements, then the whole DVT story on the CPU in a few minutes
# (scripts/demo.py: generated data, training, evaluation, real early exit, pictures).
#   bash scripts/demo.sh [demo.py options]      e.g. --output output/demo
# Set DVT_DEMO_SKIP_INSTALL=1 to skip the pip step.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${DVT_DEMO_SKIP_INSTALL:-0}" != "1" ]; then
  python3 -m pip install -q -r requirements.txt
fi
exec python3 scripts/demo.py "$@"
