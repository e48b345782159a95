"""The guide: :class:`GirsanovGuide`, composed of a part per path site (control, law of
``x_0``, conditional strategy) and the family of the other latent sites."""

from .guide import GirsanovGuide

__all__ = ["GirsanovGuide"]
