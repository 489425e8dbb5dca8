#!/usr/bin/env bash
# Downloads into .whl/ the wheels that the GPU machine's image lacks, for its Python (3.12, x86-64 Linux):
# the device machine reaches no package registry, so bench/gpu.sh installs these from the carried folder.
#
#   bash bench/make_wheels.sh        # here, with network; .whl/ is git-ignored and travels as `carry`
#
# The image already has jax (CUDA), flax, optax, orbax-checkpoint, numpy, absl-py, etils, cloudpickle,
# protobuf, PyYAML, psutil, pillow, tqdm, pandas, scipy (see /work/.library/device/KINDS.md); this adds
# what ehrxdiff_jax imports beyond them, at the versions of the CPU environment, and their own needs
# missing there (portpicker for grain). --no-deps: one version of each, nothing the image has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
