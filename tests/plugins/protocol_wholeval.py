"""A protocol plug-in (issue 19): few-shot training, the whole validation split as validation.

`fsbench run --plugin tests/plugins/protocol_wholeval.py --protocol wholeval ...` runs it and
`fsbench report --plugin tests/plugins/protocol_wholeval.py` gives its results their own tables.
This one file is all a new protocol needs (docs/protocols.md, "Add a protocol").
"""

from fsbench.protocols import Episode, MetricInfo, Protocol, Target, class_set, register_protocol, whole_test


@register_protocol("wholeval")
class WholeValidation(Protocol):
    """K shots of every class to fit on, every image of the val split to validate on (model selection as
    in CLIP_benchmark's linear probe, not few-shot), top-1 on the whole test split."""

    summary = "K shots per class to fit, the whole val split to validate, top-1 on the full test split"
    title = "Few-shot, whole validation split"
    metric_info = (MetricInfo("top1", "Top-1", help="Validation on every image of the val split."),)

    def episode(self, source, draw, targets):
        classes = class_set(source)
        train_items = source.split(draw.train_split)
        val = tuple(range(len(source.val)))
        scored = (Target(source.name, (whole_test(source, classes),)),)
        return Episode(source.name, classes, draw.train, tuple(train_items[i].label for i in draw.train),
                       val, tuple(it.label for it in source.val), scored, train_split=draw.train_split, val_split="val")
