"""Renders docs/assets/report-view.png: the Equinox guide's two reports as JupyterLab shows them.

The guide's code runs in a real Jupyter kernel (this interpreter, this decaymask), in a
notebook whose last two cells are ``report`` and ``long_report``. nbconvert's ``lab``
template exports that notebook as a page carrying JupyterLab's own stylesheet; Chromium,
the engine inside Qt WebEngine (a wheel on PyPI that ships the engine), lays the page out
offline, the long report's first group is opened down to its first table of rows as clicks
would, and the picture is cropped to those two cells. The fonts are whatever fontconfig
finds for JupyterLab's font stacks (DejaVu Sans and DejaVu Sans Mono on a bare Linux).

The renderer is large and only this script needs it; the docs build and the tests read
the committed picture::

    pip install -e '.[test]' PyQt6-WebEngine==6.11.0 pillow
    python docs/render_view.py

Run it again after a change to the report's HTML (``python tests/test_docs.py --update``
rewrites the embedded HTML view, this script the picture).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "getting-started" / "equinox.md"
PICTURE = ROOT / "docs" / "assets" / "report-view.png"
# CSS pixels, one device pixel each. At 900 the long report's inner table is wider than
# its output area and JupyterLab scrolls it sideways; render() refuses a picture like that.
WIDTH = 960
MARGIN = 8  # pixels of page kept around the two cells

_PYTHON = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def notebook(workdir: pathlib.Path):
    """The guide's code in one cell, then ``report`` and ``long_report``, executed."""
    import nbclient
    import nbformat

    # A kernel spec that runs this interpreter, importing the decaymask beside this script.
    spec = workdir / "jupyter" / "kernels" / "decaymask-docs"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "decaymask", "language": "python"}))
    # The base installation's data too: in a virtual environment made with
    # --system-site-packages, nbconvert's templates live there.
    data = [str(workdir / "jupyter"), os.path.join(sys.base_prefix, "share", "jupyter")]
    os.environ["JUPYTER_PATH"] = os.pathsep.join(data)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *sys.path])

    setup = "\n\n".join(block.strip() for block in _PYTHON.findall(GUIDE.read_text()))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in (setup, "report", "long_report")]
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="decaymask-docs", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    for cell in nb.cells:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if errors:
            raise RuntimeError(f"the guide's code failed in the kernel: {errors[0].ename}: {errors[0].evalue}")
    for cell in nb.cells[1:]:
        [result] = [o for o in cell.outputs if o.output_type == "execute_result"]
        assert result.data["text/html"].startswith('<div class="decaymask-report">'), cell.source
    return nb


def export(nb) -> str:
    import nbconvert

    page, _ = nbconvert.HTMLExporter(template_name="lab").from_notebook_node(nb)
    return page


# Run in the page once it is laid out: open the long report's first group and the first
# group inside it, down to a table of rows, as clicks would; hide every cell but the last
# two; answer where those two are.
_ARRANGE = """
(() => {
  const cells = Array.from(document.querySelectorAll('.jp-Cell'));
  const shown = cells.slice(-2);
  cells.slice(0, -2).forEach(cell => { cell.style.display = 'none'; });
  for (let group = shown[1].querySelector('details'); group; group = group.querySelector('details')) {
    group.open = true;
  }
  const top = shown[0].getBoundingClientRect().top + window.scrollY;
  const bottom = shown[1].getBoundingClientRect().bottom + window.scrollY;
  // How far any output runs past its area, where JupyterLab would scroll it sideways.
  const over = Math.max(0, ...Array.from(document.querySelectorAll('.jp-OutputArea-output'))
    .map(out => out.scrollWidth - out.clientWidth));
  return [top, bottom, document.documentElement.scrollHeight, over];
})()
"""


def render(page: str, workdir: pathlib.Path):
    """The page as Chromium draws it, cropped to the last two cells: a PIL image."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["QT_SCALE_FACTOR"] = "1"
    # Root in a container has no sandbox to enter; the page is our own, read offline.
    os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--no-sandbox")
    os.environ.setdefault("QTWEBENGINE_DISABLE_SANDBOX", "1")
    from PIL import Image
    from PyQt6.QtCore import QBuffer, QEventLoop, QIODevice, QTimer, QUrl
    from PyQt6.QtWebEngineCore import QWebEngineUrlRequestInterceptor
    from PyQt6.QtWebEngineWidgets import QWebEngineView
    from PyQt6.QtWidgets import QApplication

    class Offline(QWebEngineUrlRequestInterceptor):
        # The template links MathJax and require.js from a CDN; the reports need neither.
        def interceptRequest(self, info):
            if info.requestUrl().scheme() not in ("file", "data"):
                info.block(True)

    qt = QApplication.instance() or QApplication(["render_view"])  # noqa: F841 (kept alive)
    view = QWebEngineView()
    interceptor = Offline()
    view.page().profile().setUrlRequestInterceptor(interceptor)

    def wait(ms: int = 0, signal=None) -> list:
        loop, got = QEventLoop(), []
        if signal is not None:
            signal.connect(lambda *args: (got.extend(args), loop.quit()))
        QTimer.singleShot(ms if signal is None else 60_000, loop.quit)
        loop.exec()
        return got

    def js(code: str):
        loop, got = QEventLoop(), []
        view.page().runJavaScript(code, 0, lambda value: (got.append(value), loop.quit()))
        loop.exec()
        return got[0]

    html = workdir / "view.html"
    html.write_text(page)
    view.resize(WIDTH, 800)
    view.show()
    view.load(QUrl.fromLocalFile(str(html)))
    if wait(signal=view.loadFinished) != [True]:
        raise RuntimeError(f"Chromium could not load {html}")
    for _ in range(100):
        if js("document.fonts.status") == "loaded":
            break
        wait(50)
    js(_ARRANGE)
    wait(200)  # layout with the groups open, then measure the page
    top, bottom, height, over = js(_ARRANGE)
    view.resize(WIDTH, int(height) + 1)
    wait(1500)  # layout and paint at the new size
    top, bottom, height, over = js(_ARRANGE)
    if over > 0:
        raise RuntimeError(f"an output is {over} px wider than its area, so it scrolls: raise WIDTH")
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    view.grab().save(buffer, "PNG")
    image = Image.open(io.BytesIO(bytes(buffer.data()))).convert("RGB")
    view.close()
    box = (0, max(0, int(top) - MARGIN), WIDTH, min(image.height, int(bottom) + MARGIN))
    cropped = image.crop(box)
    if cropped.convert("L").getextrema()[0] > 200:
        raise RuntimeError("Chromium drew a blank page")
    return cropped


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        image = render(export(notebook(workdir)), workdir)
    # A palette of 256 colours is plenty for text on a white page, and under a third the size.
    from PIL import Image

    image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    PICTURE.parent.mkdir(exist_ok=True)
    image.save(PICTURE, optimize=True)
    print(f"{PICTURE.relative_to(ROOT)}: {image.width}x{image.height}, {PICTURE.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
