"""fsbench's adaptation methods, one module each (`fsbench.methods.lora`, ...).

The files live in the repository's top-level `methods/` folder, so that "where does a method live" is
answered by the layout; they are installed under the fsbench namespace (a top-level package named
`methods` would collide with research repositories that have their own). An installed wheel maps
`methods/` here (pyproject's `package-dir`); in a source checkout or an editable install this
package's path is extended to that folder.
"""

from pathlib import Path

_SOURCE = Path(__file__).resolve().parents[2] / "methods"
if _SOURCE.is_dir() and str(_SOURCE) not in __path__:
    __path__.append(str(_SOURCE))
