#!/usr/bin/env bash
# Install this example's Python requirements into the active virtual environment.
# With no environment active, create ./.venv and install there.
# flash-attn is built only where it can be: a CUDA toolkit (nvcc) and a GPU are present, or --flash-attn is given.
set -euo pipefail
cd "$(dirname "$0")"

want_flash_attn=auto
for arg in "$@"; do
  case "$arg" in
    --flash-attn) want_flash_attn=yes ;;
    --no-flash-attn) want_flash_attn=no ;;
    -h|--help) echo "usage: $0 [--flash-attn|--no-flash-attn]"; exit 0 ;;
    *) echo "unknown option: $arg (try --help)" >&2; exit 2 ;;
  esac
done

if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "No virtual environment is active: creating ./.venv (activate it later with: source .venv/bin/activate)"
  python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python_bin="$(command -v python)"
echo "Installing into $VIRTUAL_ENV ($("$python_bin" --version))"
"$python_bin" -m pip install --upgrade pip
"$python_bin" -m pip install -r requirements.txt

if [ "$want_flash_attn" = auto ]; then
  if command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    want_flash_attn=yes
  else
    want_flash_attn=no
  fi
fi
if [ "$want_flash_attn" = yes ]; then
  echo "Building flash-attn (CUDA toolkit and GPU found)..."
  "$python_bin" -m pip install ninja packaging
  "$python_bin" -m pip install flash-attn --no-build-isolation
else
  echo "flash-attn not installed (no CUDA toolkit and GPU here): attention runs on PyTorch SDPA."
fi
echo "Done."
