#!/usr/bin/env bash
# Set up the virtual environment (first run only) and run the demo or the tests.
#   bash run.sh demo      # the main job: save, kill, resume, compare
#   bash run.sh test      # the whole test suite
#   bash run.sh bench ... # benchmarks (see benchmarks/README.md)
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=$VENV/bin/python

setup() {
  if [[ ! -x $PY ]]; then
    python3 -m venv "$VENV"
  fi
  # torch first and pinned: an unpinned resolution would pull the CUDA build.
  if ! $PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    $PY -m pip install -q "torch==2.13.0"
  fi
  if ! $PY -c "import torchckpt, pytest, hypothesis, safetensors, pytest_timeout, obstore, moto.server, xxhash" 2>/dev/null; then
    $PY -m pip install -q -e ".[test]"
  fi
}

cmd=${1:-test}
shift || true
setup
case $cmd in
  demo) exec $PY examples/demo.py "$@" ;;
  test) exec $PY -m pytest tests -q "$@" ;;
  bench)
    # The benchmark's extras (chart, peers); torch stays pinned to the version installed above.
    if ! $PY -c "import matplotlib, torch_checkpointing, safetensors, s3fs" 2>/dev/null; then
      $PY -m pip install -q -c <(echo "torch==$($PY -c 'import torch; print(torch.__version__.split("+")[0])')") -e ".[bench]"
    fi
    exec $PY benchmarks/run.py "$@" ;;
  setup) ;;
  *) echo "usage: bash run.sh {demo|test|bench|setup}" >&2; exit 2 ;;
esac
