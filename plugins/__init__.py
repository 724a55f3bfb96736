"""Plugins: one folder per study, one file per run (plugins/<study>/run_<n>_<slug>.py)."""
