#!/usr/bin/env bash
# The five studies judged at the verdict budget (embedded-4m) with two seeds, and their analyses: the
# runs behind notes.md's study summaries. Many hours of a 2-core CPU, so it goes on where it stopped:
# kept/ is restored first (scripts/keep_runs.py), finished runs are reused, an interrupted one resumes
# from its checkpoint. Entries and summaries go to runs/notes-embedded-4m.md, analyses to
# runs/<study>/analyses/; `python scripts/keep_runs.py save` then keeps them for the next machine. A
# study or analysis that fails says so (its own error above) and the next goes on.
#
#   bash scripts/rejudge_studies.sh [STUDY ...]     # default: the baselines, then the five studies
set -euo pipefail
cd "$(dirname "$0")/.."
NOTES=runs/notes-embedded-4m.md
python scripts/keep_runs.py restore
studies=("$@")
[ ${#studies[@]} -gt 0 ] || studies=(baseline topk_ortho freq_order zscore_ortho contrastive adaptive_ortho)
for study in "${studies[@]}"; do
    python experiment.py study "$study" --seeds 2 --workers 2 --notes "$NOTES" || echo "study $study: exit $?" >&2
    [ "$study" = baseline ] || python experiment.py analyse "$study" --notes "$NOTES" || echo "analyse $study: exit $?" >&2
done
