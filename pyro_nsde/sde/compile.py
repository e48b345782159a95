"""Optional :func:`torch.compile` of the Euler–Maruyama step, with a clean fallback.

The simulator calls one step function ``K`` times per path. Compiled, the drift, diffusion,
control and update of a step run as one fused graph (and one fused backward). Compilation
happens on the first call for a given set of modules and shapes (seconds to tens of seconds
on a CPU) and is reused afterwards, so it pays only for long training runs; see
``benchmarks/README.md`` for what it buys. Where compilation is unavailable or fails (no C++
compiler for the inductor backend, an unsupported Python version, a callable that cannot be
traced), the step runs eagerly after a single warning; results are the same either way.
"""

import functools
import warnings

import torch

_FAILED = []  # the reason compilation was given up in this process, if it was


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=None)


def maybe_compiled(fn, enabled: bool):
    """``fn``, or a compiled version of it that falls back to ``fn`` if compilation fails."""
    if not enabled or _FAILED:
        return fn

    @functools.wraps(fn)
    def call(*args):
        if _FAILED:
            return fn(*args)
        try:
            return _compiled(fn)(*args)
        except Exception as error:
            # Run eagerly: an error of the traced code itself is raised again here, as it
            # would be without compilation; if the eager step succeeds, the compiler failed.
            result = fn(*args)
            _FAILED.append(repr(error))
            warnings.warn(
                f"torch.compile of the Euler–Maruyama step failed, running it eagerly from now "
                f"on: {error!r:.300}",
                RuntimeWarning,
                stacklevel=2,
            )
            return result

    return call
