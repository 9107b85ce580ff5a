"""Run several ``mimzoo-train`` jobs one after the other in one process, for the slow tier's resume tests:
one interpreter start (about 10 s of imports) per method instead of one per run.

Usage: ``python tests/train_sequence.py '<json list>'``. Each entry is either a list of Hydra overrides (run as
``mimzoo-train <overrides>`` would run it) or ``{"copy": [src, dst]}`` (a file copied between two runs). A job
that fails ends the sequence with its exit status.
"""

import json
import shutil
import sys

from hydra.core.global_hydra import GlobalHydra

from mimzoo.train import main

for job in json.loads(sys.argv[1]):
    if isinstance(job, dict):
        shutil.copyfile(*job["copy"])
        continue
    GlobalHydra.instance().clear()
    sys.argv = ["mimzoo-train", *job]
    try:
        main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
