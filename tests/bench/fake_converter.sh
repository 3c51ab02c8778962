#!/usr/bin/env bash
# fake_converter.sh: a stand-in for `imgpipe convert`, used only to validate the benchmark harness.
#   fake_converter.sh convert SRC DST [--output-format qcow2|raw] [--cluster-size N] [--no-progress] [--json]
# SRC: a path, http(s)://..., or s3://bucket/key; DST: a path or s3://bucket/key.
# It does what the peers do: download to a temporary file on local disk (curl, or s3tool.py for s3://),
# `qemu-img convert` it, and for an s3:// DST upload the result with s3tool.py. So it writes the whole image
# to local disk: the benchmark's disk-write row must catch that. --json prints {"output_size": N, ...}.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${BENCH_PYTHON:-$here/../../.venv/bin/python}
[ "${1:-}" = convert ] || { echo "usage: $0 convert SRC DST [options]" >&2; exit 2; }
shift
src=$1 dst=$2
shift 2
fmt=qcow2 json=0 copts=()
while [ $# -gt 0 ]; do
  case $1 in
    --output-format) fmt=$2; shift ;;
    --cluster-size) copts=(-o "cluster_size=$2"); shift ;;
    --no-progress) ;;
    --json) json=1 ;;
    *) echo "fake_converter: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$fmt" = raw ] && copts=()
tmp=$(mktemp -d "${FAKE_TMPDIR:-/var/tmp}/fake-converter.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

case $src in
  http://*|https://*) curl -sS --fail -o "$tmp/src.raw" "$src"; in=$tmp/src.raw ;;
  s3://*) "$py" "$here/s3tool.py" download "$src" "$tmp/src.raw" >/dev/null; in=$tmp/src.raw ;;
  *) in=$src ;;
esac
case $dst in
  s3://*) out=$tmp/out.img ;;
  *) out=$dst ;;
esac
qemu-img convert -f raw -O "$fmt" "${copts[@]}" "$in" "$out"
size=$(stat -c %s "$out")
case $dst in
  s3://*) "$py" "$here/s3tool.py" upload "$out" "$dst" >/dev/null ;;
esac
if [ "$json" = 1 ]; then
  vsize=$(stat -c %s "$in")
  printf '{"source": "%s", "destination": "%s", "output_format": "%s", "virtual_size": %s, "output_size": %s}\n' \
    "$src" "$dst" "$fmt" "$vsize" "$size"
fi
