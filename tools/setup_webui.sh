#!/usr/bin/env bash
# Prepare what the WebUI tests need, idempotently, for one WebUI: `tools/setup_webui.sh a1111|forge`.
#   - a checkout: $A1111_PATH / $FORGE_PATH if set, else extracted from the fetched mirrors into
#     $VDU_WEBUI_ROOT (default: ../webui beside this project, outside it: WebUI code is never committed)
#       a1111: kklouzal/stable-diffusion-webui at 82a973c0 (= A1111 v1.10.1), with the repositories its launcher
#              clones (stablediffusion's ldm, generative-models' sgm, k-diffusion, the UI assets) in repositories/
#       forge: lllyasviel/stable-diffusion-webui-forge (main), with lllyasviel/huggingface_guess at the
#              commit its launcher pins, in repositories/huggingface_guess
#   - .venv-a1111 / .venv-forge: the WebUI's own pinned requirements (transformers 4.x, its gradio) with
#     torch 2.14.1 + torchvision 0.29.1, as .venv-comfy: both WebUIs import torchvision, and the only
#     torchvision wheels here are CUDA builds, which cannot load beside the CPU torch 2.13 of .venv
#     (their ops library links libtorch_cuda); the CUDA torch runs on the CPU. Never replaced after
#     (constraints file); plus pytest
# Prints the checkout's path on the last line. Exits 3 (and says why) when no sources can be had.
set -euo pipefail
cd "$(dirname "$0")/.."
WHICH=${1:?usage: tools/setup_webui.sh a1111|forge}
MIRRORS=${VDU_MIRRORS:-/work/.mirror}
ROOT=${VDU_WEBUI_ROOT:-$(dirname "$PWD")/webui}

extract() {  # extract MIRROR COMMIT DEST: a commit's files, leaving out blobs the mirror lacks
  local git_dir=$1 commit=$2 dest=$3 tree
  tree=$(mktemp)
  git --git-dir="$git_dir" ls-tree -r "$commit" --format='%(objectname) %(path)' > "$tree"
  # git archive stops at the first absent blob and ignores :(exclude): name the present files instead
  mapfile -t present < <(cut -d' ' -f1 "$tree" | git --git-dir="$git_dir" cat-file --batch-check |
    paste -d' ' - "$tree" | awk '$2 != "missing" {for (i = 0; i < 4; i++) sub(/^[^ ]+ /, ""); print}')
  rm -f "$tree"
  rm -rf "$dest.partial" && mkdir -p "$dest.partial"
  # (it still names the absent blobs on stderr while skipping them: that noise is dropped)
  git --git-dir="$git_dir" archive "$commit" -- "${present[@]}" 2>/dev/null | tar -x -C "$dest.partial"
  mv "$dest.partial" "$dest"
}

need_mirror() {
  if [ ! -d "$MIRRORS/$1/repo" ]; then
    echo "no $WHICH checkout and no mirror of $1 at $MIRRORS/$1/repo (fetch it, or set the checkout's path)" >&2
    exit 3
  fi
}

case "$WHICH" in
  a1111)
    CHECKOUT=${A1111_PATH:-$ROOT/a1111}; MARK=modules/script_callbacks.py
    if [ ! -f "$CHECKOUT/$MARK" ] || [ ! -f "$CHECKOUT/repositories/.complete" ]; then
      if [ -n "${A1111_PATH:-}" ]; then
        echo "A1111_PATH=$A1111_PATH holds no A1111 v1.10 with its repositories" >&2; exit 3
      fi
      # A1111's launcher clones these repositories at these commits (modules/launch_utils.py); so do we
      ASSETS=6f7db241d2f8ba7457bac5ca9753331f0c266917
      repos=("kklouzal+stable-diffusion-webui 82a973c04367123ae98bd9abdf80d9eda9b910e2 ."
             "Stability-AI+stablediffusion cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf stable-diffusion-stability-ai"
             "Stability-AI+generative-models 45c443b316737a4ab6e40413d7794a7f5657c19f generative-models"
             "crowsonkb+k-diffusion ab527a9a6d347f364e3d185ba6d714e22d80cb3c k-diffusion"
             "AUTOMATIC1111+stable-diffusion-webui-assets $ASSETS stable-diffusion-webui-assets")
      for r in "${repos[@]}"; do need_mirror "${r%% *}"; done
      rm -rf "$CHECKOUT" "$CHECKOUT.partial"
      for r in "${repos[@]}"; do
        read -r name commit dir <<< "$r"
        [ "$dir" = . ] && dest=$CHECKOUT || dest=$CHECKOUT/repositories/$dir
        mkdir -p "$(dirname "$dest")"
        extract "$MIRRORS/$name/repo" "$commit" "$dest"
      done
      touch "$CHECKOUT/repositories/.complete"
    fi
    # openai-clip: the CLIP package A1111's launcher installs from openai/CLIP's archive (k-diffusion
    # imports it), from PyPI
    EXTRA=openai-clip ;;
  forge)
    CHECKOUT=${FORGE_PATH:-$ROOT/forge}; MARK=backend/patcher/lora.py
    GUESS=$CHECKOUT/repositories/huggingface_guess
    if [ ! -f "$CHECKOUT/$MARK" ] || [ ! -f "$GUESS/huggingface_guess/__init__.py" ]; then
      [ -n "${FORGE_PATH:-}" ] && { echo "FORGE_PATH=$FORGE_PATH holds no Forge with huggingface_guess" >&2; exit 3; }
      need_mirror lllyasviel+stable-diffusion-webui-forge; need_mirror lllyasviel+huggingface_guess
      rm -rf "$CHECKOUT" "$CHECKOUT.partial"
      extract "$MIRRORS/lllyasviel+stable-diffusion-webui-forge/repo" refs/heads/main "$CHECKOUT"
      mkdir -p "$CHECKOUT/repositories"
      hash=$(sed -n "s/.*HUGGINGFACE_GUESS_HASH', \"\([0-9a-f]*\)\".*/\1/p" "$CHECKOUT/modules/launch_utils.py")
      extract "$MIRRORS/lllyasviel+huggingface_guess/repo" "${hash:-HEAD}" "$GUESS"
    fi
    EXTRA= ;;
  *) echo "usage: tools/setup_webui.sh a1111|forge" >&2; exit 2 ;;
esac

VENV=.venv-$WHICH
if [ ! -f "$VENV/.installed" ]; then
  python3 -m venv --clear "$VENV"  # --clear: a half-made venv from an interrupted run is redone
  # torch needs setuptools >= 77, above the WebUIs' pin (69.5.1, kept for pkg_resources): any release
  # before 81, which still ships pkg_resources, does.
  printf 'torch==2.14.1\ntorchvision==0.29.1\nsetuptools>=77.0.3,<81\n' > "$VENV/constraints.txt"
  "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" torch torchvision
  grep -vE '^(torch|torchvision|torchaudio|setuptools)\b' "$CHECKOUT/requirements_versions.txt" \
    > "$VENV/webui-requirements.txt"
  "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" -r "$VENV/webui-requirements.txt" $EXTRA pytest
  touch "$VENV/.installed"
fi
echo "$CHECKOUT"
