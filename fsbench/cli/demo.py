"""`fsbench demo`: the whole pipeline offline in under a minute on 2 CPU cores."""

from __future__ import annotations

import typer

from fsbench.cli.app import app, console
from fsbench.cli.common import load_config, results_table
from fsbench.cli.run import execute, expand

DEMO_METHODS = ["zero_shot", "linear_probe", "lora"]
DEMO_SHOTS = [1, 2, 4]
DEMO_SEEDS = [1, 2]
# Few LoRA steps: enough to show training move the numbers, short enough for a CPU demo.
DEMO_SETS = ["lora.iters_per_shot=25"]


@app.command()
def demo(
    results: str = typer.Option("results/runs/demo", help="Where the demo's result files go."),
    data_root: str = typer.Option(".fsbench_cache/data", help="Where the synthetic dataset is generated."),
    force: bool = typer.Option(False, "--force", help="Re-run even if the demo results exist."),
) -> None:
    """Run zero_shot, linear_probe and lora on `synthetic` with the random `test-tiny` CLIP."""
    cfg = load_config(None, DEMO_SETS, data_root=data_root, results=results, device="cpu")
    specs = expand(cfg, DEMO_METHODS, ["test-tiny"], ["synthetic"], DEMO_SHOTS, DEMO_SEEDS)
    done = execute(cfg, specs, force)
    console.print(results_table(done, title="fsbench demo (test-tiny, synthetic)"))
    console.print(
        "[bold yellow]These numbers come from a CLIP with RANDOM weights on a generated dataset:[/] "
        "they show that the pipeline runs end to end, not how well any method works. "
        f"Result files: {results}. Real runs: fsbench run --method lora --backbone ViT-B/16 "
        "--dataset eurosat --data-root DATA")
