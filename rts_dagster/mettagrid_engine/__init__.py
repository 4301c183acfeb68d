"""Real MettaGrid reward streams: mettagrid task families, in-process vectorised workers
with one LP state each, a PPO learner (torch, optional extra) or a random policy, and
Metta's logging path into offline wandb runs (docs/mettagrid_engine.md).

Needs the `mettagrid` package (dev or mettagrid extra); PPO also needs torch
(`pip install -e '.[mettagrid]'`). Import the submodules: this package only sets mettagrid's log level.
"""

import os

# mettagrid sets the root logger to INFO when imported (METTAGRID_LOG_LEVEL, default INFO),
# which floods `rts refresh` with every library's INFO lines (kaleido, choreographer);
# keep Python's default unless the user asks for more.
os.environ.setdefault("METTAGRID_LOG_LEVEL", "WARNING")
