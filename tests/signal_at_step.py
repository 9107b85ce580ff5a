"""Run by test_preemption.py: ``mimzoo-train <overrides>`` that, once step K is done, sends a signal to its whole
process group (loading workers included), as SLURM or ``kill -- -<pgid>`` would; the test starts it in a session
of its own. Arguments: K, the signal's name (SIGTERM, SIGUSR1), then the Hydra overrides."""

import os
import signal
import sys

import lightning as L

import mimzoo.train as train

step, signum, overrides = int(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3:]


class SignalAt(L.Callback):
    sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == step and not self.sent:
            self.sent = True
            os.killpg(os.getpgid(0), signum)


build_callbacks = train.build_callbacks
train.build_callbacks = lambda *args, **kwargs: [SignalAt(), *build_callbacks(*args, **kwargs)]
sys.argv = ["mimzoo-train", *overrides]
train.main()
