"""Sweeps: what a Hydra job needs around it and what a multirun leaves behind.

- ``jobs``: DDP child processes that rejoin their own job under ``-m`` (no nested multiruns), a clean process
  between the jobs of a sweep, and the sweep identity W&B groups runs by (``${lightmods.sweep_group:}``).
- ``summary``: ``sweep_summary.csv`` (one row per job: overrides, status, metrics.json and summary.json
  figures), rebuilt from run dirs by ``python -m lightmods.sweep.summary <dir>``.
- ``callbacks``: the Hydra callback that writes it after every job and at the end of a multirun.
- ``analysis``: tables and plot data for the notebooks in ``notebooks/``.
"""
