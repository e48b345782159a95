"""Constraints of the guide's parameters: preconditioned supports and their inverse maps."""

import math

from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to, transform_to
from torch.distributions.transforms import AffineTransform, ComposeTransform


def inverse_softplus(y: float) -> float:
    """The ``x`` with ``softplus(x) = y > 0``."""
    return y + math.log(-math.expm1(-y))


class ScaledConstraint(constraints.Constraint):
    """The support of ``base``, reached from unconstrained space through ``x ↦ factor · x``
    first: a parameter with this constraint moves ``factor`` times as far per optimizer step
    (Adam's steps are about the learning rate in unconstrained units)."""

    def __init__(self, base, factor: float):
        self.base, self.factor = base, float(factor)
        super().__init__()

    @property
    def event_dim(self):
        return self.base.event_dim

    def check(self, value):
        return self.base.check(value)


@biject_to.register(ScaledConstraint)
@transform_to.register(ScaledConstraint)
def _scaled_transform(constraint):
    base = transform_to(constraint.base)
    return ComposeTransform([AffineTransform(0.0, constraint.factor), base])


def scaled(constraint, factor: float):
    """``constraint`` with optimizer steps ``factor`` times as large in its own units (see
    :class:`ScaledConstraint`); ``factor == 1`` returns ``constraint`` itself."""
    return constraint if factor == 1 else ScaledConstraint(constraint, factor)


__all__ = ["ScaledConstraint", "inverse_softplus", "scaled"]
