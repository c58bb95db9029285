"""fsbench: a benchmark harness for few-shot adaptation of CLIP.

Importing `fsbench` is cheap and torch-free; `fsbench.load_results` reads a results store
into a pandas DataFrame.
"""

from fsbench.results import load_results

__version__ = "0.1.0"
__all__ = ["__version__", "load_results"]
