"""Griffe extension for the API reference: render Sphinx roles in sdegen's docstrings as links.

sdegen's docstrings are Google style with a few reST roles (``:class:`~sdegen.VPSDE```,
``:func:`bits_per_dim```, ``:meth:`sigma```). Before mkdocstrings parses a docstring, each role is
rewritten to an *optional* mkdocs-autorefs cross-reference::

    :class:`~sdegen.VPSDE`  ->  <autoref identifier="sdegen.sde.VPSDE" optional><code>VPSDE</code></autoref>

A paragraph ending in reST's ``::`` (before an indented literal block) loses its second colon.
The identifier is resolved to its canonical path when possible (relative names are looked up in the
object's scope, re-exports are followed to their definition). Optional references never warn: one
that resolves to nothing rendered becomes plain code, so ``mkdocs build --strict`` cannot fail on a
docstring's cross-reference. Loaded from ``mkdocs.yml`` (``extensions: [docs/_ext/sphinx_roles.py]``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|data|attr|exc|obj|const):`(~?)([\w.]+)(?:\(\))?`")
# reST's "paragraph::" introducing an indented literal block: Markdown renders the block as code
# already, so the second colon is dropped
_LITERAL_INTRO = re.compile(r"(\S):: *\n(?= *\n)")


def _lookup(loader: Any, path: str) -> str | None:
    try:
        found = loader.modules_collection[path]
    except Exception:  # noqa: BLE001 - any failure means "not found"
        return None
    try:
        return found.final_target.path if isinstance(found, griffe.Alias) else found.path
    except Exception:  # noqa: BLE001 - unresolvable alias
        return path


def _resolve(obj: griffe.Object, loader: Any, name: str) -> str:
    """Best-effort canonical path of ``name`` as written in ``obj``'s docstring."""
    head, _, rest = name.partition(".")
    scopes = [obj, obj.parent, obj.parent.parent if obj.parent is not None else None]
    candidates = [name]
    for scope in scopes:
        if scope is None:
            continue
        candidates.append(f"{scope.path}.{name}")
        try:
            target = scope.resolve(head)
        except Exception:  # noqa: BLE001 - name not in this scope
            continue
        candidates.append(f"{target}.{rest}" if rest else target)
    for cand in candidates:
        found = _lookup(loader, cand)
        if found is not None:
            return found
    return name


class SphinxRoles(griffe.Extension):
    """Rewrite reST roles into optional autorefs once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, loader: Any, **kwargs: Any) -> None:
        if obj.docstring is None or ":" not in obj.docstring.value:
            return

        def repl(m: re.Match) -> str:
            _, tilde, name = m.groups()
            ident = _resolve(obj, loader, name)
            text = name.rsplit(".", 1)[-1] if tilde else name
            return f'<autoref identifier="{ident}" optional><code>{text}</code></autoref>'

        value = _LITERAL_INTRO.sub(r"\1:\n", obj.docstring.value)
        obj.docstring.value = _ROLE.sub(repl, value)
