"""Experiments: studies built from the library's training and evaluation (plans as data, sweeps of runs with
locking, resume and process isolation, paired statistics, claims with verdicts, study reports).

The layer above `reporting`: modules here may import slim_peft.{errors, assets, tasks, data, adapters, training,
evaluation, reporting}, always lazily (inside functions), so that planning, statistics and reports work without
loading torch; nothing below this package imports it.
"""
