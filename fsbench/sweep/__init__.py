"""`fsbench sweep` / `fsbench ablate`: a whole study in one resumable command, locally or on Ray.

`plan` expands, filters and orders the runs; `local` and `ray_executor` execute them; `summary`
tallies what happened. The CLI lives in `fsbench.cli.sweep`.
"""

from fsbench.sweep.plan import Plan, WorkQueue, ablation_specs, ablation_variants, build_plan, order_runs
from fsbench.sweep.summary import Outcome, Tally

__all__ = ["Outcome", "Plan", "Tally", "WorkQueue", "ablation_specs", "ablation_variants", "build_plan",
           "order_runs"]
