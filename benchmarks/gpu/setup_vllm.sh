# vLLM 0.26.0 on the offline GPU box, melayer's plugin loaded. Source it from the repository root, after copying
# the checkout with .carry/vllm/ (made by benchmarks/gpu/stage_vllm.sh on a connected machine):
#   source benchmarks/gpu/setup_vllm.sh || exit 1
#   python3 -c "import sys; from vllm import LLM, SamplingParams
#   llm = LLM(model=sys.argv[1], dtype='bfloat16', gpu_memory_utilization=0.5,
#             worker_extension_cls='melayer.vllm_backend.models.WorkerExtension')
#   print(llm.collective_rpc('melayer_wemask'))  # model_class: melayer.vllm_backend.models.WeMask<Arch>
#   print(llm.generate(['The capital of France is'], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text)
#   " /path/to/hf-model-folder
#   (then `source benchmarks/gpu/setup.sh` for melayer's GGUF models, and bench_engines.py --vllm as usual)
# It checks the parts, joins them, installs the wheels into $VLLM_SITE (default /tmp/vllm-site; once: a later
# source reuses it) with `pip install --no-index --no-deps --target`, adds a melayer-0.0.dist-info there whose
# entry_points.txt is melayer's `vllm.general_plugins` entry (vLLM finds plugins by importlib.metadata entry points
# on sys.path, so src/ on PYTHONPATH alone would leave the plugin unloaded), exports PYTHONPATH=$VLLM_SITE:$PWD/src
# and the offline settings, and prints any version that misses a carried wheel's pins. Returns non-zero on failure.
#
# Box (as given): python 3.12, torch 2.11 (CUDA 13), transformers 5.17, accelerate, numpy, pyyaml, requests, aiohttp,
# cloudpickle, huggingface-hub, jinja2, prometheus-client, psutil, py-cpuinfo, regex, safetensors, sentencepiece,
# tiktoken, tokenizers, triton, uvloop, xxhash, httpx, anyio, pillow, filelock, einops, numba, ... but no pydantic,
# fastapi, openai, msgspec, pyzmq, xgrammar, flashinfer.
# Carried (21 wheels, 319,975,383 bytes = 305.2 MiB; one tar in 7 parts of <= 48 MiB, 6 x 50,331,648 + 18,010,112):
#   vllm 0.26.0 (303,698,761; cp38-abi3 manylinux_2_28, built for torch 2.11 + CUDA 13)
#   pydantic 2.14.4 (494,865) + pydantic-core 2.50.5 (2,264,846) + annotated-types 0.8.0 (13,427)
#     + typing-inspection 0.4.5 (14,874): vllm.config, sampling_params, entrypoints.llm
#   typing-extensions 4.16.0 (45,571): installed only when the box's is older than pydantic's >= 4.16.0
#   pyzmq 27.3.0 (855,178): vllm.utils.network_utils, v1.serial_utils (imported even with
#     VLLM_ENABLE_V1_MULTIPROCESSING=0; by default the engine core is a separate process talking over zmq)
#   msgspec 0.23.0 (236,624): sampling_params, v1 serialization   cbor2 6.3.0 (473,147): utils.hashing
#   cachetools 8.0.2 (19,334): utils.cache   pybase64 1.5.1 (94,689): multimodal.media (imported by LLM)
#   partial-json-parser 0.2.1.1.post7 (10,877): tool_parsers (imported by LLM)
#   openai 2.54.0 (1,660,351; the last using httpx, 3.x needs httpx2) + distro 1.9.0 (20,277)
#     + sniffio 1.3.1 (10,235): entrypoints.chat_utils, mcp.tool (imported by LLM)
#   openai-harmony 0.0.8 (2,953,260): entrypoints.mcp.tool_server (via vllm.reasoning)
#   fastapi 0.136.3 (117,481) + starlette 1.10.0 (80,571): entrypoints.serve (imported by LLM's pooling path)
#   llguidance 1.7.6 (3,074,809; manylinux_2_31: glibc >= 2.31), xgrammar 0.2.7 (1,265,122),
#     apache-tvm-ffi 0.1.10 (2,571,084; vLLM's pin; xgrammar 0.2.8+ needs >= 0.1.11): the structured-output
#     backends' classes touch xgr.* / llguidance at import (v1.request -> v1.structured_output)
# Not carried, not on this path: flashinfer (an optional backend; FLASH_ATTN/FA3 is bundled and first on SM90),
# nvidia-cutlass-dsl/quack (FA4, SM100 only; the ll_bf16 warm-up skips without it), depyf (debug dumps only),
# setproctitle (optional), blake3 (multimodal hashing), mistral_common (Mistral tokenizers), compressed-tensors
# (quantized checkpoints), opentelemetry, ray, torchcodec/PyNvVideoCodec/opencv (media), gguf.
# Run on an offline H200 (python 3.12, torch 2.11, CUDA 13, transformers 5.17): the engine starts with
# torch.compile and CUDA graphs (piecewise and full), unmasked and with melayer's WeMask, and generates. The one
# change it needed: VLLM_USE_FLASHINFER_SAMPLER=0 (exported below), because the sampler's capability probe
# imports flashinfer. Box packages that miss a carried wheel's pins there, harmlessly: numba 0.68 (vLLM pins 0.65),
# setuptools 81 (vLLM pins <81); neither matters on this path. Triton's JIT, which vLLM's model runner uses even
# with enforce_eager=True, needs a C compiler and Python.h on the box (warned below). Sharing the GPU with other
# jobs: pass a gpu_memory_utilization that fits the memory free when the engine starts (else it refuses to start).
VLLM_SITE=${VLLM_SITE:-/tmp/vllm-site}
VLLM_CARRY=${VLLM_CARRY:-$PWD/.carry/vllm}
_py=${PY:-python3}

_melayer_vllm_install() {  # parts -> checked tar -> wheels -> $VLLM_SITE, plus melayer's entry point
  local tar=vllm-0.26.0-wheels.tar tmp
  if [ ! -f "$VLLM_CARRY/SHA256SUMS" ]; then
    echo "no $VLLM_CARRY/SHA256SUMS: run benchmarks/gpu/stage_vllm.sh and carry .carry/vllm/" >&2; return 1
  fi
  if ! (cd "$VLLM_CARRY" && grep '\.part' SHA256SUMS | sha256sum -c --quiet); then
    echo "a part in $VLLM_CARRY is missing or damaged: carry it again" >&2; return 1
  fi
  tmp=$(mktemp -d) || return 1
  cat "$VLLM_CARRY/$tar".part* > "$tmp/$tar" && (cd "$tmp" && grep " $tar\$" "$VLLM_CARRY/SHA256SUMS" |
    sha256sum -c --quiet) && mkdir "$tmp/w" && tar -xf "$tmp/$tar" -C "$tmp/w" && rm "$tmp/$tar" || {
    rm -rf "$tmp"; return 1; }
  # typing-extensions: only when the box's is older than pydantic 2.14's >= 4.16.0
  if "$_py" -c 'import sys, importlib.metadata as m; from packaging.version import Version as V
sys.exit(V(m.version("typing_extensions")) < V("4.16.0"))' 2> /dev/null; then rm -f "$tmp"/w/typing_extensions-*.whl; fi
  "$_py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$VLLM_SITE" "$tmp"/w/*.whl || {
    rm -rf "$tmp"; return 1; }
  rm -rf "$tmp"
  # melayer's vllm.general_plugins entry point (pyproject.toml), found by importlib.metadata on sys.path
  mkdir -p "$VLLM_SITE/melayer-0.0.dist-info" || return 1
  printf 'Metadata-Version: 2.1\nName: melayer\nVersion: 0.0\n' > "$VLLM_SITE/melayer-0.0.dist-info/METADATA"
  printf '[vllm.general_plugins]\nmelayer = melayer.vllm_backend.plugin:register\n' \
    > "$VLLM_SITE/melayer-0.0.dist-info/entry_points.txt"
  touch "$VLLM_SITE/.melayer-vllm-installed"
}

[ -f "$VLLM_SITE/.melayer-vllm-installed" ] || _melayer_vllm_install || return 1
case ":${PYTHONPATH:-}:" in
  *":$VLLM_SITE:"*) ;;
  *) export PYTHONPATH=$VLLM_SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH} ;;
esac
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# flashinfer is not carried: without this the GPU sampler imports it when the engine starts, and the start fails
export VLLM_USE_FLASHINFER_SAMPLER=0
command -v gcc > /dev/null || command -v cc > /dev/null ||
  echo "warning: no C compiler: Triton's JIT (used by vLLM) will fail" >&2
"$_py" - "$VLLM_SITE" <<'EOF' || return 1
import sys, sysconfig, importlib.metadata as md
from pathlib import Path
from packaging.requirements import Requirement
site = Path(sys.argv[1])
if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
    print("warning: no Python.h (python3-dev): Triton's JIT (used by vLLM) will fail", file=sys.stderr)
bad = []
for dist_info in sorted(site.glob("*.dist-info")):
    dist = md.Distribution.at(dist_info)
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            continue  # vLLM's optional kernels (flashinfer, ...) and others that this path never imports
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            bad.append(f"{dist.metadata['Name']} wants {req}, the box has {have}")
for line in bad:
    print("warning:", line, file=sys.stderr)
names = [ep.name for ep in md.entry_points(group="vllm.general_plugins")]
if "melayer" not in names:
    sys.exit(f"melayer's vllm.general_plugins entry point is not visible (found {names})")
print(f"vLLM {md.version('vllm')} in {site}, plugins: {', '.join(names)}; {len(bad)} version warning(s)")
EOF
return 0
