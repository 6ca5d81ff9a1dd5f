#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels that the lent GPU machines'
# image lacks (its python3 is CPython 3.12 with torch, torchvision, timm, einops, typer, rich,
# safetensors, pyyaml, matplotlib and pytest already installed) into .whl/ (git-ignored).
# Then run benchmarks/gpu_checks.sh there with .whl carried along.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 decord==0.6.0 av==18.1.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux2010_x86_64 -d .whl "$spec"
done
ls -l .whl
