"""Experiments: jobs built from the library's training and evaluation. `learn_forget.py` is one run (what
`slim-peft run` does) and its shared steps `train_adapter` and `judge`; the study modules add plans as data,
sweeps of runs with locking, resume and process isolation, paired statistics, claims with verdicts and reports.

The layer above `reporting`: modules here may import slim_peft.{errors, assets, tasks, data, adapters, training,
evaluation, reporting}; nothing below this package imports it. The study modules import the model code lazily
(inside functions), so that planning, statistics and reports run without loading a model.
"""
