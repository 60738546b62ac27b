"""Renders decaymask's notebook view of reports into one HTML page and, with Chromium
installed, takes a screenshot of it in a headless browser.

    python tools/render_report.py                  # writes report.html and report.png here
    python tools/render_report.py --out /tmp/view --dark
    python tools/render_report.py --html-only      # no browser needed

The page holds three reports as a notebook shows them (each one's ``_repr_html_``): the
demo's Equinox model (a short report: one table), a 24-block transformer (a long report:
grouped by module, each group collapsed; two opened on the page) and a policy with a rule
that matches nothing (its warning above the table). Needs decaymask with Equinox
(``pip install -e '.[equinox]'``); Chromium comes from the system (``apt-get install
chromium`` on Debian).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import warnings
from html import escape

import decaymask as dm

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>decaymask reports</title>
<style>
body {{ font-family: system-ui, sans-serif; font-size: 13px; margin: 24px;
       background: {background}; color: {color}; }}
h2 {{ font-size: 15px; margin: 28px 0 6px 0; }}
code {{ font-family: ui-monospace, monospace; }}
/* What JupyterLab does to every table cell, so the report has to win against it. */
.cell td, .cell th {{ text-align: right; }}
</style></head><body>
{sections}
</body></html>
"""


def _reports() -> list[tuple[str, dm.Report]]:
    import equinox as eqx
    import jax

    from decaymask._demo import equinox_model

    short = dm.presets.gpt().explain(equinox_model())

    def transformer(depth: int = 24, width: int = 16):
        keys = iter(jax.random.split(jax.random.key(0), 4 * depth + 2))
        blocks = [
            {
                "norm_1": eqx.nn.LayerNorm(width),
                "attn": eqx.nn.MultiheadAttention(2, width, key=next(keys)),
                "norm_2": eqx.nn.LayerNorm(width),
                "mlp": eqx.nn.MLP(width, width, 4 * width, 1, key=next(keys)),
            }
            for _ in range(depth)
        ]
        return {
            "embed": eqx.nn.Embedding(100, width, key=next(keys)),
            "blocks": blocks,
            "final_norm": eqx.nn.LayerNorm(width),
            "head": eqx.nn.Linear(width, 100, key=next(keys)),
        }

    long = dm.presets.standard().explain(eqx.filter_eval_shape(transformer))

    policy = dm.Policy(dm.decay(layer="linear"), dm.no_decay(path="decoder/*"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dm.PolicyWarning)
        model = equinox_model()
        warned = policy.explain(model)
        policy.for_equinox(model)
    if not getattr(warned, "warnings", ()):
        # A report that does not keep its warnings: show the ones the mask raised.
        try:
            warned.warnings = tuple(str(w.message) for w in caught)  # type: ignore[attr-defined]
        except AttributeError:
            pass
    return [
        ("A short report: the demo's Equinox model, dm.presets.gpt()", short),
        (f"A long report ({len(long)} rows): grouped by module, collapsed (two opened here)", long),
        ("A report with a warning", warned),
    ]


def write_page(out: pathlib.Path, dark: bool) -> pathlib.Path:
    sections = []
    for i, (title, report) in enumerate(_reports()):
        html = report._repr_html_()
        if i == 1:  # the first group and its first subgroup opened, as by a click
            html = html.replace("<details>", "<details open>", 2)
        sections.append(f'<h2>{escape(title)}</h2><div class="cell">{html}</div>')
    page = PAGE.format(
        sections="\n".join(sections),
        background="#1e1e1e" if dark else "#ffffff",
        color="#d4d4d4" if dark else "#1f2328",
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(page)
    return path


def screenshot(page: pathlib.Path, png: pathlib.Path, chromium: str, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
                f"--window-size={size}", f"--screenshot={png}", page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."))
    parser.add_argument("--dark", action="store_true", help="a dark page, as in a dark theme")
    parser.add_argument("--html-only", action="store_true", help="write the page, no screenshot")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"))
    parser.add_argument("--window-size", default="1500,2000", help="WIDTH,HEIGHT in pixels")
    args = parser.parse_args(argv)
    page = write_page(args.out, args.dark)
    print(page)
    if args.html_only:
        return 0
    chromium = shutil.which(args.chromium)
    if chromium is None:
        print(f"{args.chromium} not found: install Chromium or give --html-only", file=sys.stderr)
        return 1
    png = args.out / "report.png"
    screenshot(page, png, chromium, args.window_size)
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
