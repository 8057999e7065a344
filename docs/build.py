"""Build dwcp's API reference and user guide as HTML with pdoc: ``python docs/build.py OUT``.

The guide (docs/guide.md) is the front page (``dwcp.html``); every public module
follows, from its docstrings and type hints.

pdoc (not sphinx or mkdocs): the reference comes straight from the docstrings and type
hints this project already writes (markdown-ish, no reST roles to maintain), one small
dependency, no config tree. Warnings are errors (``-W error`` is applied here), so a
docstring that does not render or a name in ``__all__`` that does not resolve fails CI.

``dwcp`` and some of its packages import lazily (``dwcp.connect`` and friends come from
a module ``__getattr__``); those names are looked up once first, as a user's attribute
access would, so pdoc finds them in the module.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

GUIDE = Path(__file__).with_name("guide.md")


def _materialize(module: ModuleType) -> None:
    """Look up once the names a package exports lazily (a module ``__getattr__``)."""
    for name in getattr(module, "__all__", ()):
        if name not in vars(module):
            setattr(module, name, getattr(module, name))


def build(out: Path) -> None:
    warnings.simplefilter("error")
    # pdoc evaluates annotations at runtime, and Python 3.11's array.array is not
    # subscriptable there (``array[int]`` is fine for mypy): pdoc then shows the
    # annotation as written, which is what a reader needs.
    warnings.filterwarnings(
        "ignore", message=r"Error parsing type annotation array\[int\]", category=UserWarning
    )
    import pdoc
    import pdoc.render

    import dwcp

    for info in pkgutil.walk_packages(dwcp.__path__, "dwcp."):
        if info.ispkg:
            _materialize(importlib.import_module(info.name))
    _materialize(dwcp)
    # The user guide opens the reference: the front page a reader lands on.
    dwcp.__doc__ = f"{dwcp.__doc__}\n\n{GUIDE.read_text(encoding='utf-8')}"
    pdoc.render.configure(
        docformat="markdown",
        footer_text=f"dwcp {dwcp.__version__}",
        search=True,
        show_source=False,
    )
    # dwcp's __all__ lists its entry points, not its subpackages: name its public
    # modules (pdoc walks their submodules).
    public = [
        m.name
        for m in pkgutil.iter_modules(dwcp.__path__, "dwcp.")
        if not m.name.split(".")[-1].startswith("_")
    ]
    pdoc.pdoc("dwcp", *public, output_directory=out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/build.py OUTPUT_DIR")
    build(Path(sys.argv[1]))
