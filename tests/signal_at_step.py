"""Run by test_preemption.py: ``mimzoo-train <overrides>`` that, once step K is done, sends a signal to its whole
process group (loading workers and DDP ranks included), as SLURM or ``kill -- -<pgid>`` would; the test starts it
in a session of its own. ``MIMZOO_SIGNAL_AT=K:SIGNAL`` (SIGTERM, SIGUSR1) says when and what; the arguments are the
Hydra overrides, so that Lightning can start DDP ranks with this script as it is."""

import os
import signal

import lightning as L

import mimzoo.train as train

step, name = os.environ["MIMZOO_SIGNAL_AT"].split(":")
step, signum = int(step), getattr(signal, name)


class SignalAt(L.Callback):
    sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == step and not self.sent and trainer.is_global_zero:
            self.sent = True
            os.killpg(os.getpgid(0), signum)


build_callbacks = train.build_callbacks
train.build_callbacks = lambda *args, **kwargs: [SignalAt(), *build_callbacks(*args, **kwargs)]
train.main()
