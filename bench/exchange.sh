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
into B, then runs `kade exchange send` at A and waits until B's running node, notified by
the mailbox of the seal, has received the bundle by itself (download, verify, decrypt, check
every hash, reconcile the patient, coerce the identifiers, import every instance through
ingest). It measures:

  send         kade exchange send at A: read the blobs, seal, upload every chunk, seal the
               bundle (the command's own run time);
  seal→import  from the end of the send to B's log line "imported as local patient": the
               notification, the download and the import;
  end to end   from the start of the send to that log line;

and prints MB/s for each, the CPU seconds (user + system) of A's send command, of B's node
and of the mailbox in each step, and the peak RSS of the send command (/usr/bin/time), of B's
node and of the mailbox (VmHWM; B's is its whole run, the DIMSE load of one instance included).
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
done
# A sends with the command; B receives by itself, on the mailbox's notification.
KADE_EXCHANGE_POLL_SECS=0 start HOSPA --data-dir HOSPA serve --port 0 --http-port 0 --bind 127.0.0.1
KADE_EXCHANGE_POLL_SECS=60 KADE_LOG=warn,kade::exchange=info,kade_exchange=debug \
    start HOSPB --data-dir HOSPB serve --port 0 --http-port 0 --bind 127.0.0.1
B_PID=${PIDS[-1]}
A_PORT=$(port_of HOSPA DICOM)
B_PORT=$(port_of HOSPB DICOM)
echo "==> loading A over DIMSE (not timed)"
"$STORESCU" -aet STORESCU -aec KADE 127.0.0.1 "$A_PORT" "$A_DATA"/*.dcm
"$STORESCU" -aet STORESCU -aec KADE 127.0.0.1 "$B_PORT" "$B_DATA"/*.dcm

# A process's CPU seconds so far (user + system).
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
MB_CPU0=$(cpu_of "$MB_PID")
B_CPU0=$(cpu_of "$B_PID")
SEND_CONFIG=()
if [ -n "${BENCH_CHUNK_BYTES:-}" ]; then
    printf '[exchange]\nchunk_bytes = %s\n' "$BENCH_CHUNK_BYTES" >send.toml
    SEND_CONFIG=(--config send.toml)
fi
echo "==> send (A); B receives by itself"
T0=$(date +%s.%N)
/usr/bin/time -f "%M %e %U %S" -o send.time "$KADE" "${SEND_CONFIG[@]}" --data-dir HOSPA exchange send --study "$STUDY" \
    --to HOSPB --reason "Benchmark" --user bench --yes --json >send.json
T1=$(date +%s.%N)
MB_CPU1=$(cpu_of "$MB_PID")
for _ in $(seq 1 6000); do
    grep -q 'imported as local patient\|refused, nothing imported\|waits for reconciliation' HOSPB.log && break
    sleep 0.1
done
grep -o 'bundle \(downloaded\|imported\).*' HOSPB.log | sed 's/^/    /' || true
MB_RSS=$(awk '/VmHWM/ {print $2}' "/proc/$MB_PID/status")
B_RSS=$(awk '/VmHWM/ {print $2}' "/proc/$B_PID/status")
MB_CPU2=$(cpu_of "$MB_PID")
B_CPU2=$(cpu_of "$B_PID")
"$KADE" --data-dir HOSPB exchange inbox --json >inbox.json

python3 - "$MB" "$INSTANCES" "$MB_RSS" "$B_RSS" "$T0" "$T1" "$MB_CPU0" "$MB_CPU1" "$MB_CPU2" "$B_CPU0" "$B_CPU2" <<'PY'
import datetime, json, re, sys, platform, os
mb, n, mb_rss, b_rss = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0, t1 = float(sys.argv[5]), float(sys.argv[6])
mb_cpu = [float(x) for x in sys.argv[7:10]]
b_cpu = float(sys.argv[11]) - float(sys.argv[10])
send = json.load(open("send.json"))
line = next((l for l in open("HOSPB.log") if "imported as local patient" in l), None)
assert line, "B did not import the bundle; see HOSPB.log:\n" + open("HOSPB.log").read()[-2000:]
m = re.search(r"imported as local patient (\S+): (\d+) imported, (\d+) already present, (\d+) rejected", line)
assert m and m.group(1) == "B-LOCAL" and int(m.group(2)) == n, line
rows = [r for r in json.load(open("inbox.json")) if r["bundle_id"] == send["bundle_id"]]
assert rows and rows[0]["state"] == "imported" and rows[0]["local_patient_id"] == "B-LOCAL", rows
t2 = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
s_rss, s_t, s_u, s_s = open("send.time").read().split()[-4:]
s_cpu = float(s_u) + float(s_s)
mb_send, mb_recv = mb_cpu[1] - mb_cpu[0], mb_cpu[2] - mb_cpu[1]
send_s, recv_s, e2e = t1 - t0, t2 - t1, t2 - t0
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print()
print(f"Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}")
print(f"Study: {n} instances, {mb:.0f} MB, {send['total_chunks']} chunks")
print()
print("| step | seconds | MB/s | CPU s: A / B / mailbox | peak RSS (MB) |")
print("|---|---|---|---|---|")
print(f"| send at A (read, seal, upload) | {send_s:.1f} | {mb / send_s:.0f} | {s_cpu:.1f} / - / {mb_send:.1f} | A's send {int(s_rss) * 1024 / 1e6:.0f} |")
print(f"| seal → imported at B (notified, download, verify, reconcile, import) | {recv_s:.1f} | {mb / recv_s:.0f} | - / {b_cpu:.1f} / {mb_recv:.1f} | B's node {b_rss * 1024 / 1e6:.0f} |")
print(f"| **end to end** | {e2e:.1f} | **{mb / e2e:.0f}** | {s_cpu:.1f} / {b_cpu:.1f} / {mb_send + mb_recv:.1f} | mailbox {mb_rss * 1024 / 1e6:.0f} |")
PY
