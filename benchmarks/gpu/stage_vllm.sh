#!/usr/bin/env bash
# Stage vLLM 0.26.0 (the last release pinned to torch 2.11) for the offline GPU box: python 3.12, torch 2.11 +
# CUDA 13, transformers 5.17 already there (see the list in benchmarks/gpu/setup_vllm.sh). Run on a connected
# machine, from anywhere:
#   benchmarks/gpu/stage_vllm.sh [CHUNK_MB]        # CHUNK_MB: part size in MiB (default 48)
# It downloads vLLM and the wheels it imports that the box lacks (cp312, manylinux x86_64, no dependencies: the
# list below is the whole set) into .whl-vllm/, packs them into one tar and splits that into
#   .carry/vllm/vllm-0.26.0-wheels.tar.partNN   parts of at most CHUNK_MB MiB (cat them in order)
#   .carry/vllm/SHA256SUMS                       each part's checksum and the whole tar's
#   .carry/vllm/WHEELS.txt                       the wheels with their sizes
# On the box: `source benchmarks/gpu/setup_vllm.sh` joins, checks and installs them. .whl-vllm/ and .carry/ are
# git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
CHUNK_MB=${1:-${CHUNK_MB:-48}}
TAR=vllm-0.26.0-wheels.tar

# vLLM 0.26.0 and what its offline LLM(...).generate path imports that the box lacks, at versions within vLLM
# 0.26's pins. Why each is needed: see the comment block of setup_vllm.sh.
WHEELS=(
  vllm==0.26.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  pyzmq==27.3.0 msgspec==0.23.0 cbor2==6.3.0 cachetools==8.0.2 pybase64==1.5.1 partial-json-parser==0.2.1.1.post7
  openai==2.54.0 distro==1.9.0 sniffio==1.3.1 openai-harmony==0.0.8
  fastapi==0.136.3 starlette==1.10.0
  llguidance==1.7.6 xgrammar==0.2.7 apache-tvm-ffi==0.1.10
)

mkdir -p .whl-vllm
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 -d .whl-vllm "${WHEELS[@]}"

# exactly one wheel per requirement (the folder may hold other versions from earlier runs)
files=()
for req in "${WHEELS[@]}"; do
  name=${req%%==*} version=${req#*==}
  stem=$(echo "$name" | tr '-' '_')
  match=$(ls .whl-vllm/ | grep -i -E "^${stem}-${version//./\\.}-.*\.whl$" || true)
  [ "$(echo "$match" | grep -c .)" = 1 ] || { echo "expected one wheel for $req in .whl-vllm/: $match" >&2; exit 1; }
  files+=("$match")
done

mkdir -p .carry/vllm
rm -f .carry/vllm/"$TAR".part* .carry/vllm/SHA256SUMS .carry/vllm/WHEELS.txt
tar -cf ".carry/$TAR" -C .whl-vllm "${files[@]}"
split -b "${CHUNK_MB}m" -d -a 2 ".carry/$TAR" ".carry/vllm/$TAR.part"
(cd .carry/vllm && sha256sum "$TAR".part* > SHA256SUMS)
(cd .carry && sha256sum "$TAR") >> .carry/vllm/SHA256SUMS
rm -f ".carry/$TAR"
(cd .whl-vllm && ls -l "${files[@]}" | awk '{printf "%12d  %s\n", $5, $9}') > .carry/vllm/WHEELS.txt
awk -v n=${#files[@]} '{s += $1} END {printf "%12d  total (%d wheels, %.1f MiB)\n", s, n, s / 1048576}' \
  .carry/vllm/WHEELS.txt >> .carry/vllm/WHEELS.txt
cat .carry/vllm/WHEELS.txt
ls -l .carry/vllm/
