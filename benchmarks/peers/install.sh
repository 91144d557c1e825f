#!/usr/bin/env bash
# One virtual environment per peer group under $PEERS (default .peers/): their pins conflict
# (sae-lens pins transformer-lens < 4), so no two groups share one. torch 2.13.0 goes in first
# (the version mechscope's Makefile pins), then mechscope itself (editable), then the peers.
# A group whose stamp exists is not reinstalled; `rm -r .peers` starts again.
# Usage: benchmarks/peers/install.sh PYTHON TORCH_SPEC GROUP...   (TORCH_SPEC '' keeps pip's choice)
set -euo pipefail
python=$1; torch_spec=$2; shift 2
peers=${PEERS:-.peers}
mkdir -p "$peers"

packages() {
  case $1 in
    pyvene) echo "pyvene" ;;
    tl)     echo "transformer-lens nnsight" ;;
    sae)    echo "sae-lens eai-sparsify" ;;
    *)      echo "unknown peer group '$1' (known: pyvene tl sae)" >&2; exit 2 ;;
  esac
}

# pip's complaints about this machine's local index mirrors are noise; its errors still show
pip_install() {
  local venv=$1; shift
  "$venv/bin/python" -m pip --quiet --disable-pip-version-check install "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

for group in "$@"; do
  venv="$peers/$group"
  stamp="$venv/.installed-$(printf '%s %s' "$torch_spec" "$(packages "$group")" | cksum | cut -d' ' -f1)"
  if [ -e "$stamp" ]; then echo "peers: $group already installed in $venv"; continue; fi
  t0=$(date +%s)
  test -x "$venv/bin/python" || "$python" -m venv "$venv"
  if [ -n "$torch_spec" ]; then pip_install "$venv" "$torch_spec"; fi
  pip_install "$venv" -e . $(packages "$group")
  rm -f "$venv"/.installed-* && touch "$stamp"
  echo $(( $(date +%s) - t0 )) > "$venv/.install-seconds"
  echo "peers: installed $group ($(packages "$group")) in $venv in $(cat "$venv/.install-seconds") s"
  "$venv/bin/python" -m pip --disable-pip-version-check list 2>/dev/null \
    | grep -i -E '^(torch|transformers|pyvene|transformer[-_]lens|nnsight|sae[-_]lens|eai[-_]sparsify) ' || true
done
