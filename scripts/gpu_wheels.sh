#!/usr/bin/env bash
# Fill the git-ignored .whl/ with the wheels a GPU machine without network lacks (run here, after `make setup`).
# That machine has CUDA torch, numpy, scikit-learn, pytest and transformers, and Python 3.12; it lacks hydra-core,
# omegaconf, bitsandbytes, deepspeed, torch-pruning, torchao and pydantic. scripts/gpu_check.sh installs .whl/ there.
set -euo pipefail
cd "$(dirname "$0")/.."
W=.whl
mkdir -p "$W"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms="$platforms --platform $p"
done
# binary wheels for CPython 3.12, pinned as constraints-cpu.txt pins them here
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d "$W" bitsandbytes==0.50.2 hydra-core==1.3.8 omegaconf==2.3.0 torch-pruning==1.6.1 torchao==0.18.0 hjson \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection 'typing-extensions>=4.16' \
  nvidia-ml-py==13.615.71 py-cpuinfo
# sdists: antlr4 is pure Python; DeepSpeed's setup imports torch, so it is built with this venv's torch
.venv/bin/python -m pip wheel -q --no-deps -w "$W" antlr4-python3-runtime==4.9.3
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$W" deepspeed==0.19.8
du -sh "$W"
