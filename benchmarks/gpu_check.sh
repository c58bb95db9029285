#!/usr/bin/env bash
# Every GPU path of fsbench run once, with numbers, on a bare GPU machine without network access.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--smoke] [--wheels DIR] [--work DIR] [--export DIR]
#                                [--budget SECONDS] [--only a,b] [--skip a,b] [--force-install] [--keep-work]
#
# 1. Installs what the GPU image lacks (open_clip_torch, ftfy, wcwidth) from a folder of wheels
#    (--wheels, env FSBENCH_WHEELS, default REPO/.wheels, filled by benchmarks/fetch_wheels.sh),
#    offline (pip --no-index --no-deps) into a scratch folder on PYTHONPATH; a no-op when open_clip
#    and ftfy already import (unless --force-install). fsbench runs from this working tree.
# 2. Writes OUT_DIR/machine.json (GPU name, driver, torch, date) and runs the checks of
#    benchmarks/gpu_checks/plan.py, each under its own timeout, all under one budget (default 480 s
#    on a GPU): see benchmarks/gpu_checks/driver.py for what lands in OUT_DIR (summary.txt,
#    results.json, gpu_measurements.md, checks/*.json, logs/*.log).
# 3. --export DIR copies the top-level results plus one archive of checks/ and logs/ to DIR
#    (5 files: the device tool brings back at most 8).
# --smoke: the same steps on CPU, tiny sizes (about 2 minutes on 2 busy cores); GPU-only checks skipped.
# Exit code: 0 every check passed or was skipped, 1 a check failed, 2 usage (or no CUDA without
# --smoke), 3 install failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=${FSBENCH_WHEELS:-$REPO/.wheels}
OUT="" WORK="" EXPORT="" SMOKE=0 FORCE=0 KEEP=0
DRIVER_ARGS=()

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --force-install) FORCE=1 ;;
    --keep-work) KEEP=1 ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
    --work) WORK=${2:?--work needs a folder}; shift ;;
    --export) EXPORT=${2:?--export needs a folder}; shift ;;
    --budget|--only|--skip) DRIVER_ARGS+=("$1" "${2:?$1 needs a value}"); shift ;;
    -h|--help) usage 0 ;;
    -*) echo "error: unknown option $1" >&2; usage 2 ;;
    *) [ -z "$OUT" ] || { echo "error: one OUT_DIR only" >&2; exit 2; }; OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "error: OUT_DIR missing" >&2; usage 2; }
mkdir -p "$OUT/logs" && OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/fsbench-gpu-check.XXXXXX")}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
[ -z "$EXPORT" ] || { mkdir -p "$EXPORT" && EXPORT=$(cd "$EXPORT" && pwd); }
[ ! -d "$WHEELS" ] || WHEELS=$(cd "$WHEELS" && pwd)
SITE=$WORK/site
export PYTHONPATH="$REPO:$REPO/benchmarks:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$REPO" || exit 2

install_missing() {
  # open_clip_torch and ftfy (+ wcwidth), offline, from $WHEELS into $SITE.
  if [ "$FORCE" = 0 ] && "$PY" -c "import open_clip, ftfy" 2>/dev/null; then
    echo "install: open_clip and ftfy already import; nothing installed"
    return 0
  fi
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "error: open_clip/ftfy do not import and $WHEELS holds no wheels: run benchmarks/fetch_wheels.sh" \
         "where pip can reach a registry, then carry .wheels to this machine" >&2
    return 3
  fi
  echo "install: $(cd "$WHEELS" && ls ./*.whl | tr '\n' ' ')-> $SITE"
  "$PY" -m pip install --isolated --no-index --no-deps --no-compile --disable-pip-version-check --quiet \
      --target "$SITE" "$WHEELS"/*.whl || return 3
  "$PY" -c "import open_clip, ftfy; print('install: open_clip', open_clip.__version__, 'from', open_clip.__file__)" \
      || { echo "error: open_clip still does not import after installing the wheels" >&2; return 3; }
}

install_missing 2>&1 | tee "$OUT/logs/install.log"
status=${PIPESTATUS[0]}
[ "$status" = 0 ] || exit "$status"

"$PY" benchmarks/gpu_checks/machine.py --out "$OUT/machine.json" >"$OUT/logs/machine.log" 2>&1 \
  || echo "warning: machine facts incomplete (see $OUT/logs/machine.log)" >&2
[ "$SMOKE" = 1 ] && DRIVER_ARGS+=(--smoke)
"$PY" benchmarks/gpu_checks/driver.py "$OUT" --work "$WORK" "${DRIVER_ARGS[@]}"
rc=$?

if [ -n "$EXPORT" ]; then
  mkdir -p "$EXPORT"
  cp "$OUT"/summary.txt "$OUT"/results.json "$OUT"/gpu_measurements.md "$OUT"/machine.json "$EXPORT"/ 2>/dev/null
  (cd "$OUT" && tar czf "$EXPORT/gpu_check_details.tgz" $(ls -d checks logs 2>/dev/null))
fi
[ "$KEEP" = 1 ] || rm -rf "$WORK"
exit "$rc"
