#!/usr/bin/env bash
# Prepare what the ComfyUI tests need, idempotently:
#   - a ComfyUI checkout: $COMFYUI_PATH if set, else cloned from the fetched mirror into .cache/comfyui
#   - .venv-comfy: ComfyUI's requirements with torch 2.14.1 + torchvision 0.29.1 (the pair this
#     machine holds on disk; ComfyUI imports torchvision, which the CPU torch 2.13 of .venv lacks)
# Prints the checkout's path on the last line. Exits 3 (and says why) when no ComfyUI can be had.
set -euo pipefail
cd "$(dirname "$0")/.."
MIRROR=${COMFYUI_MIRROR:-/work/.mirror/Comfy-Org+ComfyUI/repo}
COMFY=${COMFYUI_PATH:-$PWD/.cache/comfyui}
if [ ! -f "$COMFY/main.py" ]; then
  if [ -n "${COMFYUI_PATH:-}" ] || [ ! -d "$MIRROR" ]; then
    echo "no ComfyUI checkout at ${COMFYUI_PATH:-.cache/comfyui} and no mirror at $MIRROR" >&2
    exit 3
  fi
  rm -rf "$COMFY"
  git clone -q --no-checkout "$MIRROR" "$COMFY"
  # The mirror lacks a few large blobs (an LLM tokenizer we never use): check out all but those.
  git -C "$COMFY" sparse-checkout init --no-cone 2>/dev/null  # it complains of the missing blob; the list below fixes that
  { echo '/*'; git -C "$COMFY" ls-tree -r HEAD --format='%(objectname) %(path)' |
      while read -r obj path; do git -C "$COMFY" cat-file -e "$obj" 2>/dev/null || echo "!/$path"; done
  } > "$COMFY/.git/info/sparse-checkout"
  git -C "$COMFY" checkout -q HEAD
fi
VENV=.venv-comfy
if [ ! -f "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  grep -vE '^(torch|torchvision|torchaudio)\b' "$COMFY/requirements.txt" > "$VENV/comfy-requirements.txt"
  echo "torch==2.14.1" > "$VENV/constraints.txt"
  "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" -r "$VENV/comfy-requirements.txt" \
      -r requirements.txt pytest
  touch "$VENV/.installed"
fi
echo "$COMFY"
