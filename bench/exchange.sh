#!/usr/bin/env bash
# Exchange benchmark: end-to-end push of a CT study from hospital A through the mailbox to
# hospital B on loopback. Run `bench/exchange.sh --help` for usage.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/exchange.sh [--help]

Starts three processes on 127.0.0.1, each with its own empty data directory (SQLite + files):
the mailbox (kade mailbox serve), hospital A and hospital B (kade serve), enrolled with
Kade's own commands. Loads a synthetic CT study into A over DIMSE (not timed) and one
instance of the same patient (same BSN, birth date and family name, another Patient ID)
into B, then measures:

  send     kade exchange send at A: read the blobs, seal, upload every chunk, seal the bundle;
  receive  kade exchange receive at B: download, verify, decrypt, check every hash, reconcile
           the patient, coerce the identifiers and import every instance through ingest;

and prints MB/s for each and end to end (payload MB / (send + receive) seconds), the CPU
seconds (user + system) of the node and of the mailbox in each step, and the peak RSS of the
sending and receiving processes (/usr/bin/time) and of the mailbox (VmHWM).
It checks that B imported every instance under its own Patient ID.

Environment:
  BENCH_INSTANCES  instances in the study (512x512 16-bit CT, ~525 kB each)   (default 2000)
  BENCH_DATA       cache directory of generated data sets        (default /tmp/kade-bench-data)
  BENCH_WORK       parent directory of the three data directories (default /tmp/kade-bench-work,
                   marked with chattr +T where the filesystem has it: see below)
  BENCH_KEEP       1 keeps the data directories and logs           (default 0)
  BENCH_CHUNK_BYTES  plaintext bytes per chunk (exchange.chunk_bytes) (default: Kade's)
  KADE_BIN         kade binary (default: the release build in $CARGO_TARGET_DIR,
                   <repo>/target or ~/.cache/kade-target)

Figures: MB = 10^6 bytes of the instances' Part 10 files; RSS in MB = 10^6 bytes.

The work directory: ext4 places a new file's inode in its directory's block group, and in a
group churned by many earlier create-and-delete runs (a long-lived /tmp) finding a free inode
cost about 0.85 ms of CPU per file on the benchmark machine, against 0.035 ms in a fresh group:
some 2 s for the receiving node's 2,000 blobs alone. The work directory is therefore marked
`chattr +T` (ext4's "top of a directory hierarchy"), so that each run's data directories get
a fresh group, as a hospital's dedicated data directory would. Pass BENCH_WORK=/tmp to measure
without that.

Example:
  cargo build --release --bin kade && bench/exchange.sh
  BENCH_INSTANCES=200 bench/exchange.sh
EOF
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) echo "exchange.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
INSTANCES=${BENCH_INSTANCES:-2000}
DATA_ROOT=$(realpath -m -- "${BENCH_DATA:-/tmp/kade-bench-data}")
WORK_PARENT=$(realpath -m -- "${BENCH_WORK:-/tmp/kade-bench-work}")
if [ -z "${BENCH_WORK:-}" ]; then
    mkdir -p "$WORK_PARENT"
    chattr +T "$WORK_PARENT" 2>/dev/null || true
fi
KEEP=${BENCH_KEEP:-0}
BSN=999911120

find_kade() {
    local d
    for d in "${CARGO_TARGET_DIR:-}" "$REPO/target" "$HOME/.cache/kade-target"; do
        if [ -n "$d" ] && [ -x "$d/release/kade" ]; then
            echo "$d/release/kade"
            return
        fi
    done
    echo "exchange.sh: no release build found; run: cargo build --release --bin kade" >&2
    exit 1
}
KADE=${KADE_BIN:-$(find_kade)}
command -v storescu >/dev/null || { echo "exchange.sh: needs DCMTK (apt-get install dcmtk)" >&2; exit 1; }
STORESCU=/usr/bin/storescu
[ -x "$STORESCU" ] || STORESCU=$(command -v storescu)
[ -x /usr/bin/time ] || { echo "exchange.sh: needs /usr/bin/time (apt-get install time)" >&2; exit 1; }

A_DATA="$DATA_ROOT/exchange-a-$INSTANCES"
B_DATA="$DATA_ROOT/exchange-b"
echo "==> data: $INSTANCES instances for A (cached in $A_DATA), 1 for B"
python3 "$HERE/gen_ct.py" --out "$A_DATA" --instances "$INSTANCES" --studies 1 --series 4 \
    --patient-id A-BENCH --bsn "$BSN" --seed 7
python3 "$HERE/gen_ct.py" --out "$B_DATA" --instances 1 --studies 1 --series 1 \
    --patient-id B-LOCAL --bsn "$BSN" --seed 8
STUDY=$(python3 -c "import pydicom,sys,glob; print(pydicom.dcmread(sorted(glob.glob(sys.argv[1]+'/*.dcm'))[0], stop_before_pixels=True).StudyInstanceUID)" "$A_DATA")
MB=$(python3 -c "import os,glob,sys; print(sum(os.path.getsize(f) for f in glob.glob(sys.argv[1]+'/*.dcm'))/1e6)" "$A_DATA")

WORK=$(mktemp -d "$WORK_PARENT/kade-bench-exchange.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "$KEEP" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
cd "$WORK"
export KADE_LOG=warn

# Starts `kade ARGS…` in the background with stdout to $1.out; waits for "kade: ready".
start() {
    local name=$1
    shift
    "$KADE" "$@" >"$name.out" 2>"$name.log" &
    PIDS+=($!)
    for _ in $(seq 1 300); do
        grep -q '^kade: ready' "$name.out" 2>/dev/null && return
        sleep 0.1
    done
    echo "exchange.sh: $name did not start:" >&2
    cat "$name.log" >&2
    exit 1
}
port_of() { sed -n "s/^kade: $2 listening on [^ ]*:\([0-9]*\).*/\1/p" "$1.out" | head -1; }

echo "==> mailbox, hospital A, hospital B"
"$KADE" --data-dir mailbox mailbox init >/dev/null
start mailbox --data-dir mailbox mailbox serve --port 0 --bind 127.0.0.1
MB_PID=${PIDS[-1]}
MB_URL="https://127.0.0.1:$(port_of mailbox mailbox)"
for org in HOSPA HOSPB; do
    "$KADE" --data-dir $org exchange init --org $org --name "Hospital $org" --mailbox "$MB_URL" >/dev/null
    "$KADE" --data-dir mailbox mailbox enroll --request $org/exchange/request.json --out $org.json >/dev/null
    "$KADE" --data-dir $org exchange join $org.json >/dev/null
    "$KADE" --data-dir $org peer add STORESCU --host 127.0.0.1 --allow echo,store >/dev/null
    KADE_EXCHANGE_POLL_SECS=0 start $org --data-dir $org serve --port 0 --http-port 0 --bind 127.0.0.1
done
A_PORT=$(port_of HOSPA DICOM)
B_PORT=$(port_of HOSPB DICOM)
echo "==> loading A over DIMSE (not timed)"
"$STORESCU" -aet STORESCU -aec KADE 127.0.0.1 "$A_PORT" "$A_DATA"/*.dcm
"$STORESCU" -aet STORESCU -aec KADE 127.0.0.1 "$B_PORT" "$B_DATA"/*.dcm

# The mailbox's CPU seconds so far (user + system).
mb_cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$MB_PID/stat"; }
MB_CPU0=$(mb_cpu)
SEND_CONFIG=()
if [ -n "${BENCH_CHUNK_BYTES:-}" ]; then
    printf '[exchange]\nchunk_bytes = %s\n' "$BENCH_CHUNK_BYTES" >send.toml
    SEND_CONFIG=(--config send.toml)
fi
echo "==> send (A)"
/usr/bin/time -f "%M %e %U %S" -o send.time "$KADE" "${SEND_CONFIG[@]}" --data-dir HOSPA exchange send --study "$STUDY" \
    --to HOSPB --reason "Benchmark" --user bench --yes --json >send.json
MB_CPU1=$(mb_cpu)
echo "==> receive (B)"
KADE_LOG=kade_exchange=debug /usr/bin/time -f "%M %e %U %S" -o receive.time "$KADE" --data-dir HOSPB exchange receive --json \
    >receive.json 2>receive.log
grep -o 'bundle \(downloaded\|imported\).*' receive.log | sed 's/^/    /' || true
MB_RSS=$(awk '/VmHWM/ {print $2}' "/proc/$MB_PID/status")
MB_CPU2=$(mb_cpu)

python3 - "$MB" "$INSTANCES" "$MB_RSS" "$MB_CPU0" "$MB_CPU1" "$MB_CPU2" <<'PY'
import json, sys, platform, os, subprocess
mb, n, mb_rss = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
mb_cpu = [float(x) for x in sys.argv[4:7]]
send = json.load(open("send.json"))
recv = json.load(open("receive.json"))
assert len(recv) == 1 and recv[0]["result"] == "imported", recv
assert recv[0]["imported"] == n, recv
assert recv[0]["patient_id"] == "B-LOCAL", recv
s_rss, s_t, s_u, s_s = open("send.time").read().split()[-4:]
r_rss, r_t, r_u, r_s = open("receive.time").read().split()[-4:]
s_t, r_t = float(s_t), float(r_t)
s_cpu, r_cpu = float(s_u) + float(s_s), float(r_u) + float(r_s)
mb_send, mb_recv = mb_cpu[1] - mb_cpu[0], mb_cpu[2] - mb_cpu[1]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print()
print(f"Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}")
print(f"Study: {n} instances, {mb:.0f} MB, {send['total_chunks']} chunks")
print()
print("| step | seconds | MB/s | CPU s: node / mailbox | peak RSS (MB) |")
print("|---|---|---|---|---|")
print(f"| send at A (read, seal, upload) | {s_t:.1f} | {mb / s_t:.0f} | {s_cpu:.1f} / {mb_send:.1f} | {int(s_rss) * 1024 / 1e6:.0f} |")
print(f"| receive at B (download, verify, reconcile, import) | {r_t:.1f} | {mb / r_t:.0f} | {r_cpu:.1f} / {mb_recv:.1f} | {int(r_rss) * 1024 / 1e6:.0f} |")
print(f"| end to end | {s_t + r_t:.1f} | {mb / (s_t + r_t):.0f} | {s_cpu + r_cpu:.1f} / {mb_send + mb_recv:.1f} | mailbox {mb_rss * 1024 / 1e6:.0f} |")
PY
