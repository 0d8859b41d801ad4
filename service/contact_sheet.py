"""An HTML contact sheet of near-duplicate groups: one self-contained file to look through.

Why self-contained: the sheet is mailed, archived or opened on another machine, away from the
store, so every thumbnail is inlined as a ``data:`` URI and the page loads nothing else (no
script, no external style). Keys are HTML-escaped: they come from file names.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from ..core.files import atomic_write
from ..index.dedup import DedupParams, DuplicateGroup
from ..index.store import IndexStore

__all__ = ["write_contact_sheet"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
section { border-top: 1px solid #ccc; padding: .8rem 0; }
h2 { font-size: 1rem; margin: 0 0 .5rem; }
.row { display: flex; flex-wrap: wrap; gap: .8rem; }
figure { margin: 0; width: 180px; }
figure img { max-width: 180px; max-height: 180px; display: block; }
figcaption { font-size: .8rem; word-break: break-all; }
.none { width: 180px; height: 120px; background: #eee; display: flex; align-items: center;
        justify-content: center; font-size: .8rem; }
ul { font-size: .8rem; margin: .4rem 0 0; }
"""


def _figure(store: IndexStore, key: str) -> str:
    data = store.thumbnail(key)
    name = html.escape(key)
    if not data:
        picture = '<div class="none">no thumbnail</div>'
    else:
        encoded = base64.b64encode(data).decode("ascii")
        picture = f'<img alt="{name}" src="data:image/jpeg;base64,{encoded}">'
    return f"<figure>{picture}<figcaption>{name}</figcaption></figure>"


def _section(store: IndexStore, number: int, group: DuplicateGroup) -> str:
    pairs = "".join(
        f"<li>{html.escape(a)} ~ {html.escape(b)}: {score:.3f} (cosine {cosine:.3f})</li>"
        for a, b, score, cosine in group.pairs)
    figures = "".join(_figure(store, key) for key in group.keys)
    return (f'<section class="group"><h2>group {number}: {len(group.keys)} images, '
            f"weakest link {group.score:.3f}</h2><div class=\"row\">{figures}</div>"
            f"<ul>{pairs}</ul></section>")


def write_contact_sheet(
    store: IndexStore, groups: Sequence[DuplicateGroup], params: DedupParams, path: Path
) -> Path:
    """Write the sheet of ``groups`` to ``path`` (atomically) and return it."""
    sections = "".join(_section(store, n, group) for n, group in enumerate(groups, start=1))
    title = html.escape(f"{len(groups)} near-duplicate groups in {store.path.name}")
    body = sections or "<p>No near-duplicates at this threshold.</p>"
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>duplicate-score threshold {params.threshold:.2f} (cosine weight "
        f"{params.cosine_weight:g}), candidates at cosine >= "
        f"{params.candidate_cosine:.2f} among {params.k} neighbours</p>{body}</body></html>"
    )
    return atomic_write(path, page)
