"""Screenshot the report in headless Chromium at 1,400 px and check that nothing makes it wider.

Takes a report (``--report results/report/index.html``) or builds one from a results folder
(``--results results``: every experiment under models/, the heatmaps under heatmaps/, splits/
folds.csv, cohort/left_out.csv and segmentation/metrics.json, written to ``--out-dir``), then

* measures the page in Chromium: a copy of the page beside it with a small script that writes
  ``document.documentElement.scrollWidth``, the page height and the elements reaching past the
  window into the DOM, read back with ``--dump-dom``;
* screenshots the whole page (``--png``) at the window width;
* prints the scroll width against the window width and exits 1 when the page is wider.

Without Chromium (``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH) it prints one
line saying so and exits 0.

    python bench/report_screenshot.py --results results --png report.png
    python bench/report_screenshot.py --report results/report/index.html --png report.png
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WIDTH = 1400
MAX_HEIGHT = 16000  # px of the full-page screenshot at most (Chromium's window limit is near)
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# written into the page's DOM after load, read back from --dump-dom
PROBE = """<script>
window.addEventListener("load", () => {
  const doc = document.documentElement, wide = [], text = document.body.getBoundingClientRect().right;
  let furthest = 0, past_text = 0;
  for (const el of document.body.querySelectorAll("*")) {
    if (el.parentElement.closest(".wide")) continue;  // scrolls inside its box, the page stays narrow
    const right = el.getBoundingClientRect().right;
    furthest = Math.max(furthest, right);
    if (el.tagName === "TABLE" && right > text + 0.5) past_text += 1;
    if (right > window.innerWidth + 0.5) wide.push(`${el.tagName.toLowerCase()}.${el.className || ""} ${Math.round(right)}`);
  }
  const scrolled = [...document.querySelectorAll(".wide")].filter(b => b.scrollWidth > b.clientWidth).length;
  const out = document.createElement("pre");
  out.id = "page-probe";
  out.textContent = JSON.stringify({scroll_width: doc.scrollWidth, window_width: window.innerWidth,
    height: doc.scrollHeight, past_window: wide.slice(0, 10), tables_scrolling_in_their_box: scrolled,
    furthest_right: Math.round(furthest), text_right: Math.round(text), tables_past_text: past_text});
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _chromium(browser: str, *args: str, timeout: float = 120) -> str:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def measure(browser: str, page: Path, width: int = WIDTH) -> dict:
    """The page's scroll width, height and the elements past the window, at ``width`` px: a copy
    with :data:`PROBE` beside the page (so that its images and links resolve), then removed."""
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>", 1))
    try:
        dom = _chromium(browser, f"--window-size={width},1000", "--virtual-time-budget=5000", "--dump-dom",
                        probe.resolve().as_uri())
    finally:
        probe.unlink()
    found = re.search(r'<pre id="page-probe">(.*?)</pre>', dom, re.S)
    if found is None:
        raise RuntimeError(f"{page}: the probe wrote nothing (did the page load?)")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def screenshot(browser: str, page: Path, png: Path, width: int, height: int) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    _chromium(browser, f"--screenshot={png.resolve()}", f"--window-size={width},{min(height, MAX_HEIGHT)}",
              "--virtual-time-budget=5000", page.resolve().as_uri())


def build_report(results: Path, out_dir: Path) -> Path:
    """The report of a results folder (the workflow's layout), as make_report would write it."""
    from msamil_core import layout
    from msamil_core.reporting.report import run_dirs, write_report

    root = str(results)
    models = sorted(p for p in Path(layout.experiment_dir("*", root)).parent.glob("*") if run_dirs(p))
    heatmaps = {p.parent.name: str(p) for p in sorted(Path(root, "heatmaps").glob("*/fold0")) if (p / "summary.csv").exists()}
    optional = {"folds": layout.folds_file(0, root), "left_out": layout.cohort_file("left_out.csv", root),
                "segmentation": layout.segmentation_file("metrics.json", root)}
    write_report({p.name: str(p) for p in models}, out_dir, heatmaps=heatmaps,
                 **{k: v for k, v in optional.items() if Path(v).exists()},
                 config_files=[p for p in ("config/config.yaml",) if Path(p).exists()])
    return out_dir / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--report", type=Path, help="a report's index.html")
    source.add_argument("--results", type=Path, help="a results folder to build the report from")
    parser.add_argument("--out-dir", type=Path, help="where --results writes the report (default: a temporary folder)")
    parser.add_argument("--png", type=Path, help="write the full-page screenshot here")
    parser.add_argument("--width", type=int, default=WIDTH, help="window width, px (default %(default)s)")
    args = parser.parse_args(argv)

    browser = find_chromium()
    if browser is None:
        print(f"skipped: no headless Chromium ({', '.join(BROWSERS)}) on PATH; e.g. apt-get install chromium")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        page = args.report or build_report(args.results, args.out_dir or Path(tmp) / "report")
        figures = measure(browser, page, args.width)
        if args.png:
            screenshot(browser, page, args.png, args.width, figures["height"])
            print(f"screenshot: {args.png} ({args.width} x {min(figures['height'], MAX_HEIGHT)} px)")
    fits = figures["scroll_width"] <= args.width
    print(f"page: scroll width {figures['scroll_width']} px at a {figures['window_width']} px window "
          f"({'fits' if fits else 'too wide'}), height {figures['height']} px; tables scrolling in their own box: "
          f"{figures['tables_scrolling_in_their_box']}; furthest right edge {figures['furthest_right']} px, "
          f"text column ends at {figures['text_right']} px, tables past it: {figures['tables_past_text']}")
    for element in figures["past_window"]:
        print(f"  past the window: {element}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
