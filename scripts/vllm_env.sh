#!/usr/bin/env bash
# Installs vLLM (requirements-vllm.txt) into an environment of its own for the real-vLLM tests
# (tests/vllm), once, and prints the path of its Python. The environment is cached outside the
# repository, under ~/.cache/vllm-dispatcher/vllm-<digest of requirements-vllm.txt>, so that every
# clone and worktree of this machine shares it, and a changed requirement file makes a new one.
# About 3.5 GB and a few minutes the first time; a fraction of a second afterwards.
#
#   VLLM_ENV_DIR      the environment's directory (default: as above)
#   VLLM_ENV_PYTHON   the Python that creates it (default: python3.11, or python3 if it is 3.11, as
#                     the local torch 2.13.0+cpu wheel needs)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
requirements="$root/requirements-vllm.txt"
digest=$(sha256sum "$requirements" | cut -c1-12)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vllm-dispatcher"
env_dir=${VLLM_ENV_DIR:-$cache/vllm-$digest}
python=${VLLM_ENV_PYTHON:-}
if [ -z "$python" ]; then  # python3.11, or python3 if that is 3.11
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'
    then
      python=$candidate
      break
    fi
  done
fi

mkdir -p "$(dirname "$env_dir")"
exec 9>"$env_dir.lock"
flock 9  # another test run installing the same environment: wait for it

if [ ! -f "$env_dir/.installed" ]; then
  if [ -z "$python" ]; then
    echo "vllm_env.sh: Python 3.11 is needed to install vLLM (torch 2.13.0+cpu is built for it);" \
         "set VLLM_ENV_PYTHON" >&2
    exit 1
  fi
  echo "vllm_env.sh: installing vLLM into $env_dir (once; a few minutes)" >&2
  started=$(date +%s)
  rm -rf "$env_dir"
  "$python" -m venv "$env_dir"
  # pip's log goes to a file beside the environment; its end is shown if the install fails.
  if ! "$env_dir/bin/python" -m pip install --progress-bar off --no-deps -r "$requirements" >"$env_dir.log" 2>&1; then
    tail -n 30 "$env_dir.log" >&2
    echo "vllm_env.sh: the install failed (whole log: $env_dir.log)" >&2
    exit 1
  fi
  "$env_dir/bin/python" -c "import vllm" >&2
  touch "$env_dir/.installed"
  echo "vllm_env.sh: installed in $(( $(date +%s) - started )) s, $(du -sh "$env_dir" | cut -f1)" >&2
fi
echo "$env_dir/bin/python"
