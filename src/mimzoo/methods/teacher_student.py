"""The one EMA-teacher mechanism every teacher-student method shares (iBOT now; DINO, data2vec,
BYOL-style methods later): the teacher copies the student, never receives gradients, and after every
optimiser step moves as ``teacher = m * teacher + (1 - m) * student`` with ``m`` cosine-scheduled
per step from ``momentum`` to ``momentum_end`` (0.996 -> 1 in DINO/iBOT)."""

from __future__ import annotations

import torch

from mimzoo.optim import cosine_ramp, schedule_steps

from .base import MIMMethod, host_scalar


class TeacherStudentMethod(MIMMethod):
    """A subclass builds its student and teacher modules, calls :meth:`pair` for each, and gets the
    EMA update, the momentum schedule and its logging (``train/ema_momentum``) from here."""

    def __init__(
        self, mask: dict | None = None, optim: dict | None = None, momentum: float = 0.996, momentum_end: float = 1.0
    ):
        super().__init__(mask=mask, optim=optim)
        if not 0.0 <= momentum <= momentum_end <= 1.0:
            raise ValueError(
                f"EMA momentum must satisfy 0 <= momentum <= momentum_end <= 1, got {momentum}, "
                f"{momentum_end}; iBOT uses model.momentum=0.996 model.momentum_end=1.0"
            )
        self.momentum, self.momentum_end = momentum, momentum_end
        self._ema_pairs: list[tuple[str, str]] = []

    def pair(self, teacher: str, student: str) -> None:
        """Register attributes ``teacher`` and ``student`` (same architecture, up to which modules are
        shared): the teacher starts as a copy of the student's weights and is frozen;
        :meth:`update_teacher` moves it."""
        t, s = getattr(self, teacher), getattr(self, student)
        t.load_state_dict(s.state_dict())
        t.requires_grad_(False)
        self._ema_pairs.append((teacher, student))

    def momentum_at(self, step: int) -> float:
        return cosine_ramp(step, schedule_steps(self.trainer), self.momentum, self.momentum_end)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """Every teacher parameter whose name the student's parameters also have follows it (iBOT's
        ``names_common``): a module shared under two names counts once, under its first name, so a
        teacher whose patch layer is its ``[CLS]`` layer follows the student's ``[CLS]`` layer."""
        for teacher, student in self._ema_pairs:
            s = dict(getattr(self, student).named_parameters())
            pairs = [(p, s[name].detach()) for name, p in getattr(self, teacher).named_parameters() if name in s]
            t = [p for p, _ in pairs]
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, [q for _, q in pairs], alpha=1.0 - momentum)

    def optimizer_step(self, *args, **kwargs):
        """The optimiser step, then the EMA step with the momentum of this step (0-based, as iBOT's
        ``momentum_schedule[it]``); once per optimiser step, so gradient accumulation is respected."""
        super().optimizer_step(*args, **kwargs)
        m = self.momentum_at(self.global_step)
        self.update_teacher(m)
        self.log("train/ema_momentum", host_scalar(m))
