"""HTML pages from the jinja2 templates in ``templates/`` (the report, each slide's heatmap page).

Values are HTML-escaped; DataFrames go in through the ``table`` filter (pandas' ``to_html``, in a
box that scrolls sideways when the table is wider than the page).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"


@lru_cache(maxsize=None)
def _environment():
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    # a table scrolls in its own box rather than widening the page (base.html.j2's .wide)
    env.filters["table"] = lambda df: Markup('<div class="wide">' + df.to_html(
        index=False, escape=True, border=0, classes="t", na_rep="n/a") + "</div>")
    env.globals["zip"] = zip
    return env


def render(template: str, **context) -> str:
    """A page from one of the templates in ``templates/`` (values are HTML-escaped)."""
    return _environment().get_template(template).render(**context)
