"""Dataset readers: the 11 CoOp datasets, the four test-only ImageNet variants of domain generalisation
(imagenet_variants), ImageFolder and a synthetic set. Every module here is imported (and so registers)
on the first registry look-up."""

from fsbench.data.base import DATASETS, DatasetSplits, Item, register_dataset
from fsbench.registry import import_all

DATASETS.add_loader(lambda: import_all("fsbench.data"))


def load_dataset(name: str, root) -> DatasetSplits:
    """Read dataset `name` from the data root `root` (did-you-mean on unknown names)."""
    from pathlib import Path

    return DATASETS.get(name)(Path(root).expanduser())


__all__ = ["DATASETS", "DatasetSplits", "Item", "load_dataset", "register_dataset"]
