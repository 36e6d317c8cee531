"""Keyword arguments of ``save`` and ``load``: which are known, which reach the hooks, which are mistakes.

``save(path, state_dict, **kwargs)`` hands its keywords to the writer's commit
hook, as the reference does; torchckpt itself acts on :data:`WRITE_KEYWORDS`.
A keyword that neither torchckpt nor the hook takes is, given to a
checkpointer's ``save``, a ``TypeError`` naming it when it is a near miss of one
that is taken (a misspelled ``allow_pickle`` must not pass silently) and
otherwise a ``UserWarning`` naming it: the reference's ``save`` hands any
keyword on to its writer, and code written for it passes its own. Given to
``CheckpointWriter.write`` directly (the reference's low-level API) any unknown
keyword is a ``UserWarning``; given to ``load``, a ``TypeError``. A hook method with
``**kwargs`` takes every keyword; one without gets only those it names.
``load(path, ..., **kwargs)`` knows :data:`READ_KEYWORDS`.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any

from .utils import caller_stacklevel

__all__ = ["READ_KEYWORDS", "WRITE_KEYWORDS", "accepted_keywords", "check_keywords", "keywords_for"]

#: Keywords of ``save``/``CheckpointWriter.write`` that torchckpt acts on.
WRITE_KEYWORDS = frozenset({"allow_pickle", "incremental_base", "metadata"})
#: Keywords of ``load``/``CheckpointReader.read`` that torchckpt acts on.
READ_KEYWORDS = frozenset({"allow_pickle", "rank", "verify"})


def accepted_keywords(*methods: Callable[..., Any]) -> frozenset[str] | None:
    """The keywords that any of ``methods`` (hook methods called as ``m(path, **kwargs)``) takes.

    Returns:
        Their names, or None when one of them takes any keyword (``**kwargs``)
        or its signature cannot be read.
    """
    names: set[str] = set()
    for method in methods:
        try:
            params = list(inspect.signature(method).parameters.values())
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        path_param = positional[0] if positional else None  # ``path`` is passed positionally
        names.update(
            p.name for p in params if p is not path_param and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )
    return frozenset(names)


def keywords_for(method: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``kwargs`` that ``method`` takes (all of it when it has ``**kwargs``)."""
    taken = accepted_keywords(method)
    return dict(kwargs) if taken is None else {k: v for k, v in kwargs.items() if k in taken}


def check_keywords(
    kwargs: Mapping[str, Any],
    *,
    call: str,
    path: str,
    known: Collection[str],
    hook_keywords: Collection[str] | None = frozenset(),
    hook_name: str | None = None,
    unknown: str = "raise",
    refuse_near_misses: bool = False,
) -> None:
    """Raise ``TypeError`` (or warn) for a keyword that neither torchckpt nor the hook takes.

    Args:
        kwargs: The keywords given.
        call: The call they were given to (``"save"``, ``"load"``), for the message.
        path: The checkpoint path, for the message.
        known: The keywords torchckpt acts on.
        hook_keywords: The keywords the hook takes; None: any (``**kwargs``).
        hook_name: The hook's class name (None: there is no hook).
        unknown: What an unknown keyword gets: ``"raise"`` (``TypeError``),
            ``"warn"`` (``UserWarning``) or ``"ignore"`` (left to the writer).
        refuse_near_misses: Raise for an unknown keyword that is a near miss of
            a taken one (a misspelling), whatever ``unknown`` says.

    Raises:
        TypeError: An unknown keyword (named, with the nearest known one) as
            ``unknown`` and ``refuse_near_misses`` say, or an ``allow_pickle``
            that is not a bool.
    """
    pickle_flag = kwargs.get("allow_pickle", False)
    if "allow_pickle" in known and not isinstance(pickle_flag, bool):
        raise TypeError(f"{call}() of {path}: allow_pickle must be True or False, got {pickle_flag!r}")
    if hook_keywords is None:
        return
    allowed = set(known) | set(hook_keywords)
    for name in kwargs:
        if name in allowed:
            continue
        near = difflib.get_close_matches(name, sorted(allowed), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        if hook_name is None:
            hook = "there is no commit hook to take others" if call == "save" else "it takes no others"
        elif hook_keywords:
            hook = f"the commit hook {hook_name} takes {', '.join(sorted(hook_keywords))}"
        else:
            hook = f"the commit hook {hook_name} takes none"
        message = (
            f"{call}() of {path} got an unexpected keyword argument {name!r}{hint}; torchckpt's keywords are "
            f"{', '.join(sorted(known))} and {hook}"
        )
        if unknown == "raise" or (refuse_near_misses and near):
            raise TypeError(message)
        if unknown == "warn":
            warnings.warn(message + " (ignored)", UserWarning, stacklevel=caller_stacklevel())
