#!/usr/bin/env bash
# The five studies judged at the verdict budget (embedded-4m) with two seeds, and their analyses: the
# runs behind notes.md's study summaries. Many hours of a 2-core CPU, so it goes on where it stopped:
# kept/ is restored first (scripts/keep_runs.py), finished runs are reused, an interrupted one resumes
# from its checkpoint. Entries and summaries go to runs/notes-embedded-4m.md, analyses to
# runs/<study>/analyses/, and kept/ is saved at the end (commit it). A study or analysis that fails
# says why and the next goes on; the script then exits 1, naming them.
#
#   bash scripts/rejudge_studies.sh [STUDY ...]     # default: the baselines, then the five studies
set -euo pipefail
cd "$(dirname "$0")/.."
NOTES=runs/notes-embedded-4m.md
python scripts/keep_runs.py restore
studies=("$@") failed=()
[ ${#studies[@]} -gt 0 ] || studies=(baseline topk_ortho freq_order zscore_ortho contrastive adaptive_ortho)
for study in "${studies[@]}"; do
    python experiment.py study "$study" --seeds 2 --workers 2 --notes "$NOTES" || failed+=("study $study")
    [ "$study" = baseline ] || python experiment.py analyse "$study" --notes "$NOTES" || failed+=("analyse $study")
done
python scripts/keep_runs.py save
[ ${#failed[@]} -eq 0 ] || { echo "failed (each said why above): ${failed[*]}" >&2; exit 1; }
