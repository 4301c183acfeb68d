"""Real MettaGrid reward streams: mettagrid task families, in-process vectorised workers
with one LP state each, a PPO learner (torch, optional extra) or a random policy, and
Metta's logging path into offline wandb runs (docs/mettagrid_engine.md).

Needs the `mettagrid` package (dev or mettagrid extra); PPO also needs torch
(`pip install -e '.[mettagrid]'`). Import the submodules: this package imports nothing.
"""
