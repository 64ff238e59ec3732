#!/usr/bin/env bash
# Prepare, here (where PyPI is reachable), the wheels benchmarks/gpu_check.sh installs on a borrowed GPU machine that
# has no network and takes at most 64 MiB of uploaded files (the repository's working tree + named ignored folders).
#
#   bash benchmarks/gpu_prepare.sh                 # fills .gpu-wheels/ (ignored by git) and prints the upload size
#   bash benchmarks/gpu_prepare.sh --check-size    # only prints the upload size of what is there now
#
# Then carry .gpu-wheels to the GPU machine with the working tree and run `bash benchmarks/gpu_check.sh` there.
#
# What it brings (--no-deps, one version of each; the GPU machine's own torch, numpy, huggingface-hub, tokenizers,
# safetensors, psutil, pyyaml and regex are used as they are, and gpu_check.py lists any requirement they miss):
# - peft-depth, built from this tree;
# - transformers (peft-depth needs >= 5.23; the GPU image has 5.17), peft and accelerate, at the versions installed in
#   .venv (the newest set the tests ran on) or, without .venv, the newest PyPI has;
# - bitsandbytes without most of its wheel: its Python package, its 60 KB CPU library and the CUDA library for the GPU
#   machine's torch, `libbitsandbytes_cuda<BNB_CUDA>.so` (about 4 MB). The whole wheel (43 MB, a library for each of
#   CUDA 11.8 ... 13.2, ROCm and XPU) does not fit the upload. bitsandbytes loads the library of torch.version.cuda
#   (12.8 -> cuda128; with none of that version it takes the highest of the same major below it, else the lowest
#   above); the GPU image's torch is 2.11.0+cu130, hence BNB_CUDA=130. For a torch built for CUDA 12.x set
#   BNB_CUDA=128 (or 126; the CUDA 12 libraries are 21-27 MB each). Several: BNB_CUDA="130 128".
#
# Settings (environment): GPU_WHEELS_DIR (.gpu-wheels), BNB_CUDA (130), GPU_PYTHON_VERSION (3.12, the GPU image's
# Python), GPU_PLATFORM (manylinux x86_64), GPU_EXTRA_WHEELS (more requirement specifiers to bring, e.g.
# "tokenizers==0.23.3"), PYTHON (.venv/bin/python, else python3: builds the peft-depth wheel and runs pip download).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS_DIR:-.gpu-wheels}
BNB_CUDA=${BNB_CUDA:-130}
TARGET_PYTHON=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MIB=64
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

upload_size() {
  # What the device tool sends: tracked files, untracked files git does not ignore, shared/ if present, and the
  # carried wheel folder. Exits 1 when that is not under the limit.
  "$PYTHON" - "$WHEELS" "$LIMIT_MIB" <<'PY'
import os, subprocess, sys

wheels, limit_mib = sys.argv[1], int(sys.argv[2])
listed = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True
).stdout.split(b"\0")


def size(path):
    try:
        return os.lstat(path).st_size  # a link travels as a link
    except FileNotFoundError:
        return 0  # tracked but deleted in the working tree


def folder(path):
    return sum(size(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


tree = sum(size(os.fsdecode(path)) for path in set(listed) if path)
shared = folder("shared") if os.path.isdir("shared") and not os.path.islink("shared") else 0
carried = folder(wheels) if os.path.isdir(wheels) else 0
if os.path.isdir(wheels):
    for name in sorted(os.listdir(wheels)):
        print(f"  {name:<80} {size(os.path.join(wheels, name)) / 2**20:7.2f} MiB")
total = tree + shared + carried
mib = 2**20
print(f"wheels ({wheels}): {carried / mib:.2f} MiB; working tree: {tree / mib:.2f} MiB; shared/: {shared / mib:.2f} MiB")
print(f"upload total: {total / mib:.2f} MiB (limit {limit_mib} MiB)")
if total >= limit_mib * mib:
    print(f"gpu_prepare.sh: the upload is over the {limit_mib} MiB limit", file=sys.stderr)
    sys.exit(1)
PY
}

trim_bnb() {
  # trim_bnb DIR OUT CUDA...: copy the bitsandbytes wheel in DIR to OUT without the native libraries of other backends
  "$PYTHON" - "$@" <<'PY'
import os, re, sys, zipfile

scratch, out, cuda_versions = sys.argv[1], sys.argv[2], sys.argv[3:]
(wheel,) = [name for name in os.listdir(scratch) if name.endswith(".whl")]
keep = {f"libbitsandbytes_cuda{v}.so" for v in cuda_versions} | {"libbitsandbytes_cpu.so"}
native = re.compile(r"^bitsandbytes/libbitsandbytes_\w+\.(so|dll|dylib)$")
with zipfile.ZipFile(os.path.join(scratch, wheel)) as source:
    names = source.namelist()
    present = {name.split("/")[-1] for name in names if native.match(name)}
    missing = keep - present
    if missing:
        sys.exit(f"{wheel} has no {sorted(missing)}; it has {sorted(present)}")
    dropped = {name for name in names if native.match(name) and name.split("/")[-1] not in keep}
    with zipfile.ZipFile(os.path.join(out, wheel), "w", zipfile.ZIP_DEFLATED) as target:
        for name in names:
            if name in dropped:
                continue
            data = source.read(name)
            if name.endswith(".dist-info/RECORD"):  # list only what the trimmed wheel holds
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if line.split(",")[0] not in dropped) + "\n").encode()
            target.writestr(source.getinfo(name), data)
print(f"  kept {sorted(keep)}; dropped {len(dropped)} other native libraries")
PY
}

case "${1:-}" in
  --check-size) upload_size; exit $? ;;
  --trim-bnb) shift; trim_bnb "$@"; exit $? ;;  # tests: --trim-bnb DIR OUT CUDA...
esac

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64)
if [ -n "${GPU_PLATFORM:-}" ]; then PLATFORMS=(--platform "$GPU_PLATFORM"); fi
download=("$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON"
  --implementation cp "${PLATFORMS[@]}")

echo "peft-depth wheel, built from this tree"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" .

# The versions the newest-set tests ran on (.venv), where there is one; else whatever PyPI has newest.
mapfile -t SPECS < <("$PYTHON" - <<'PY'
import importlib.metadata as metadata

floors = {"transformers": ">=5.23", "peft": ">=0.21.2", "accelerate": ">=1.10.1", "bitsandbytes": ">=0.50"}
for name, floor in floors.items():
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}{floor}")
PY
)
BNB_SPEC=${SPECS[3]}
read -r -a EXTRA <<<"${GPU_EXTRA_WHEELS:-}"
echo "downloading ${SPECS[*]:0:3} ${EXTRA[*]} for CPython $TARGET_PYTHON"
"${download[@]}" -d "$WHEELS" "${SPECS[@]:0:3}" "${EXTRA[@]}"

echo "$BNB_SPEC, keeping its Python package and the CUDA $BNB_CUDA library"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"${download[@]}" -d "$scratch" "$BNB_SPEC"
trim_bnb "$scratch" "$WHEELS" $BNB_CUDA

upload_size
