"""What every backend is (docs/DESIGN.md §8): options as a dataclass, a check before the capture, and the
forms of the locked graph it builds."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import fx

from ..lock import kl_divergence
from ..runtime import LockedForms


class Backend:
    """One way of running a locked graph. Subclasses are dataclasses of their options and name themselves
    (``name``: what ``optimize(model, backend=name)`` accepts) and the forms they build (``padded``,
    ``packed``: see ``runtime.LockedForms``)."""

    name: ClassVar[str]
    padded: ClassVar[bool]
    packed: ClassVar[bool]

    @classmethod
    def from_options(cls, **options) -> "Backend":
        """The backend with ``options``; a clear error naming any option it does not take."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            takes = ", ".join(sorted(fields)) or "no options"
            raise ValueError(f"unknown option(s) {unknown} for backend {cls.name!r}; it takes {takes}")
        return cls(**options)

    def check(self) -> None:
        """Fail before any work is done if something the backend needs is missing."""

    def forms(self, locked: fx.GraphModule) -> LockedForms:
        """The callables that run the functional locked graph ``locked`` (which stays as it is, for export)."""
        raise NotImplementedError

    def lock_kl(self):
        """The lock rule's KL (``lock.kl_divergence``'s signature) as this backend runs it."""
        return kl_divergence


class InProcessBackend(Backend):
    """A backend that runs the graph in this process: each form is ``passes.pipeline.running_form`` of the
    locked graph, finished by ``compile``."""

    def compile(self, gm: fx.GraphModule, packed: bool = False):
        """The callable that runs ``gm`` (a locked graph, or a dense one for a baseline) in this backend."""
        raise NotImplementedError

    def forms(self, locked: fx.GraphModule) -> LockedForms:
        return LockedForms(self.compile(locked, packed=False) if self.padded else None,
                           self.compile(locked, packed=True) if self.packed else None)


class BuiltOnFirstCall:
    """A graph that ``build()`` makes when it is first called (a form a decode may never run)."""

    def __init__(self, build):
        self.build, self.graph = build, None

    def __call__(self, *inputs):
        if self.graph is None:
            self.graph = self.build()
        return self.graph(*inputs)
