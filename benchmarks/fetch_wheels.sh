#!/usr/bin/env bash
# Fill the wheels folder that benchmarks/gpu_check.sh installs from on a machine without network.
#
#   bash benchmarks/fetch_wheels.sh [--python 3.12] [--dest DIR] [--extra NAME==VERSION ...]
#
# Run it where pip reaches a package registry. Downloads, for the GPU image's Python version
# (--python, default 3.12: the H100/H200 image's python3), the pure-Python wheels that image
# lacks: open_clip_torch, ftfy and ftfy's wcwidth (versions: env OPEN_CLIP_VERSION, FTFY_VERSION,
# WCWIDTH_VERSION). They are py3-none-any wheels, so `--platform any` fits every machine; their
# other needs (torch, torchvision, timm, regex, tqdm, huggingface_hub, safetensors) are in the
# image, and gpu_check.sh installs with --no-deps. --extra adds more pure-Python wheels.
# The folder (default REPO/.wheels, ignored by git) travels to the device machine only when named:
# device `run` with carry [".wheels"]. About 2 MB. Ray cannot travel that way: its wheel alone is
# about 79 MB, over the 64 MiB a device call carries.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYVER=3.12
DEST=$REPO/.wheels
PACKAGES=("open_clip_torch==${OPEN_CLIP_VERSION:-3.3.0}" "ftfy==${FTFY_VERSION:-6.3.1}" "wcwidth==${WCWIDTH_VERSION:-0.9.4}")

while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER=${2:?--python needs a version such as 3.12}; shift ;;
    --dest) DEST=${2:?--dest needs a folder}; shift ;;
    --extra) PACKAGES+=("${2:?--extra needs NAME==VERSION}"); shift ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$DEST"
"${PYTHON:-python3}" -m pip download --isolated --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --platform any -d "$DEST" "${PACKAGES[@]}"
echo "wheels for Python $PYVER in $DEST ($(du -sh "$DEST" | cut -f1)):"
ls -1 "$DEST"
