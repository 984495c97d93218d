"""What every pass shares (docs/DESIGN.md §5): its result, the finish after a change, the debug switch.

A pass is a function ``GraphModule -> PassResult`` wrapped by ``graph_pass``; called, the wrapped pass
returns the graph module, after dead-code elimination, ``graph.lint()`` and ``recompile()`` if the pass
changed it. A pass that finds nothing to do returns ``PassResult(gm, False)`` and is logged as such.
With the environment variable ``SURELOCK_DEBUG_PASSES=1`` every pass prints the graph it returns.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable

from torch import fx

logger = logging.getLogger("surelock_fx.passes")
DEBUG_ENV = "SURELOCK_DEBUG_PASSES"


@dataclasses.dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Dead-code elimination, lint and recompile: the end of every pass that changed ``gm``."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class GraphPass:
    """A graph pass: ``pass_(gm)`` returns the graph module, ``pass_.run(gm)`` the PassResult.

    ``after`` names the passes that must run before this one where a pipeline holds both
    (``passes.pipeline.check_order``).
    """

    def __init__(self, fn: Callable[[fx.GraphModule], PassResult], after: tuple[str, ...] = ()):
        functools.update_wrapper(self, fn)
        self.fn, self.name, self.after = fn, fn.__name__, after

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        return self.run(gm).graph_module

    def run(self, gm: fx.GraphModule) -> PassResult:
        result = self.fn(gm)
        if result.modified:
            finish(result.graph_module)
        else:
            logger.debug("%s: nothing to do", self.name)
        if debug_enabled():
            state = "changed" if result.modified else "unchanged"
            print(f"--- after {self.name} ({state}) ---\n{result.graph_module.graph}", flush=True)
        return result

    def __repr__(self) -> str:
        return f"GraphPass({self.name})"


def graph_pass(fn=None, *, after: tuple[str, ...] = ()):
    """Decorator: ``fn(gm) -> PassResult`` as a GraphPass (``@graph_pass`` or ``@graph_pass(after=...)``)."""
    if fn is None:
        return lambda f: GraphPass(f, after)
    return GraphPass(fn, after)
