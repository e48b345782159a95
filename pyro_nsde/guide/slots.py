"""Named parameters of the guide's modules, addressed as ``(module, attribute)`` slots.

The guide keeps its learned tensors in :class:`~pyro.nn.PyroModule` containers keyed by site
name (``controls.x.loc``, ``x0_locs.x``, ...), which fixes their names in Pyro's parameter
store. A :class:`ParamSlot` reads one of them (constrained, through Pyro) and moves it in
unconstrained space, which is how a Laplace fit re-bases what SVI has learned.
"""

from operator import attrgetter

import pyro
from pyro.distributions.transforms import transform_to


class ParamSlot:
    """The parameter ``attr`` of ``module``: a :class:`~pyro.nn.PyroParam` (or a plain
    tensor attribute)."""

    def __init__(self, module, attr: str):
        self.module, self.attr = module, attr

    @classmethod
    def of(cls, container, name: str) -> "ParamSlot":
        """The slot of a dotted ``name`` (e.g. a site ``"a.b"``) below ``container``."""
        parent, _, leaf = name.rpartition(".")
        return cls(attrgetter(parent)(container) if parent else container, leaf)

    def get(self):
        return getattr(self.module, self.attr)

    def unregister(self) -> None:
        """Remove the parameter from Pyro's parameter store (where a module created inside a
        running guide put it at once), for a parameter the guide will not read: it then
        neither appears among the learned ones nor gets an optimizer. The module keeps it, so
        the guide's ``state_dict`` is unchanged; reading it registers it again."""
        store = pyro.get_param_store()
        name = self.module._pyro_get_fullname(self.attr)
        if name in store:
            del store[name]

    def move(self, value, old=None):
        """Set the parameter to ``value`` (expanded to its shape) or, given the value ``old``
        it was last set to, move it by ``value - old`` in its unconstrained space (keeping
        what was learned since). Returns ``value`` as set, to be the next ``old``."""
        current = self.get().detach()
        value = value.to(current).expand_as(current)
        if old is None:
            new = value
        else:
            constraint, _ = self.module._pyro_params[self.attr]
            transform = transform_to(constraint)
            new = transform(transform.inv(current) + transform.inv(value) - transform.inv(old))
        setattr(self.module, self.attr, new.clone())
        return value.clone()


__all__ = ["ParamSlot"]
