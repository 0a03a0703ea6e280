"""Model families: one small adapter per kind of model (see :mod:`layergeo.families.base`).

``get_family("seq2seq")`` returns the registered family; a new family is one module that
subclasses :class:`Family`, decorates it with ``@register_family("name")`` and is imported here.
"""

from layergeo.families.base import Family, family_names, get_family, register_family
from layergeo.families import causal, encoder, seq2seq  # noqa: F401,E402 - register the families

__all__ = ["Family", "family_names", "get_family", "register_family"]
