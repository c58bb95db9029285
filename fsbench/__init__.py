"""fsbench: a benchmark harness for few-shot adaptation of CLIP.

Importing `fsbench` is cheap and torch-free: `fsbench.load_results(path)` reads a results store
into a pandas DataFrame and `fsbench.write_report(df, out_dir, ...)` writes tables and figures.
"""

from fsbench.results import load_results

__version__ = "0.1.0"
__all__ = ["__version__", "load_results", "write_report"]


def __getattr__(name: str):
    if name == "write_report":  # lazy: keeps matplotlib out of `import fsbench`
        from fsbench.report import write_report

        return write_report
    raise AttributeError(f"module 'fsbench' has no attribute {name!r}")
