#!/usr/bin/env bash
# C-STORE ingest benchmark: Kade against Orthanc on the same machine and the same data.
# Run `bench/ingest.sh --help` for usage.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/ingest.sh [--help]

Compares C-STORE ingest of Kade and Orthanc (default SQLite index, file storage) on this
machine. For each server and each association count it starts the server on an empty
storage directory, sends the whole data set with DCMTK (K associations = the sorted file
list split into K parts sent by K concurrent clients), measures the wall time, reads the
server's peak RSS (VmHWM) before stopping it, checks that the server holds every instance,
and prints a markdown table with machine and version information.

The data set (synthetic 512x512 16-bit CT, Explicit VR Little Endian, unique UIDs, noisy
pixels) is generated once with bench/gen_ct.py and reused by later runs.

Everything listens on 127.0.0.1 only. Servers are stopped on exit, also on error or ^C.
Missing tools are installed when running as root: pydicom and numpy (pip), dcmtk and
orthanc (apt-get; the Orthanc system service is not used).

Environment:
  BENCH_INSTANCES      instances in the data set                      (default 2000)
  BENCH_STUDIES        studies they are spread over                   (default 1)
  BENCH_SERIES         series in total, over all studies              (default 4)
  BENCH_DATA           cache directory of generated data sets         (default /tmp/kade-bench-data)
  BENCH_ASSOCIATIONS   association counts to run, space-separated     (default "1 4")
  BENCH_SERVERS        servers to run, space-separated: kade orthanc  (default "kade orthanc")
  BENCH_CLIENT         DCMTK sender: storescu or dcmsend              (default storescu)
  BENCH_WORK           parent directory of the servers' storage       (default /tmp)
  BENCH_KEEP           1 keeps the servers' storage and logs          (default 0)
  BENCH_NO_INSTALL     1 never installs anything, fails instead       (default 0)
  KADE_BIN             kade binary; default: a release build if one is found, else a debug
                       build, looked up in $CARGO_TARGET_DIR, <repo>/target and
                       ~/.cache/kade-target (build one: cargo build --release --bin kade)
  ORTHANC_BIN          Orthanc binary                                 (default Orthanc)
  ORTHANC_SYNC_STORAGE true/false sets Orthanc's SyncStorageArea; unset keeps its default
  BENCH_ORTHANC_NODELAY 1 (default) runs Orthanc with TCP_NODELAY=1 in its environment, which
                       its DICOM server (DCMTK) needs to turn Nagle's algorithm off; 0 runs
                       it without, as its packaged service does, where each C-STORE response
                       can wait for a delayed ACK. Kade always sets TCP_NODELAY on its sockets.

Figures: MB = 10^6 bytes of DICOM files sent (file sizes on disk); RSS in MB = 10^6 bytes.
The wall time runs from the start of the first client to the exit of the last one, so it
includes association set-up and DCMTK reading the files (kept in the page cache).

Example:
  BENCH_INSTANCES=200 bench/ingest.sh
  KADE_BIN=target/release/kade BENCH_ASSOCIATIONS="1 2 4 8" bench/ingest.sh
EOF
}

case "${1:-}" in
    -h | --help)
        usage
        exit 0
        ;;
    "") ;;
    *)
        echo "ingest.sh: unknown argument: $1 (see --help)" >&2
        exit 2
        ;;
esac

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")

INSTANCES=${BENCH_INSTANCES:-2000}
STUDIES=${BENCH_STUDIES:-1}
SERIES=${BENCH_SERIES:-4}
DATA_ROOT=$(realpath -m -- "${BENCH_DATA:-/tmp/kade-bench-data}")
ASSOCIATIONS=${BENCH_ASSOCIATIONS:-"1 4"}
SERVERS=${BENCH_SERVERS:-"kade orthanc"}
CLIENT=${BENCH_CLIENT:-storescu}
WORK_PARENT=$(realpath -m -- "${BENCH_WORK:-/tmp}")
KEEP=${BENCH_KEEP:-0}
NO_INSTALL=${BENCH_NO_INSTALL:-0}
ORTHANC_BIN=${ORTHANC_BIN:-Orthanc}
ORTHANC_NODELAY=${BENCH_ORTHANC_NODELAY:-1}
CALLING_AE=STORESCU
HOST=127.0.0.1

for v in INSTANCES STUDIES SERIES; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "ingest.sh: BENCH_$v must be a positive integer, got '${!v}'" >&2
        exit 2
    fi
done
for k in $ASSOCIATIONS; do
    if ! [[ $k =~ ^[1-9][0-9]*$ ]]; then
        echo "ingest.sh: BENCH_ASSOCIATIONS must list positive integers, got '$k'" >&2
        exit 2
    fi
done
for s in $SERVERS; do
    case $s in
        kade | orthanc) ;;
        *)
            echo "ingest.sh: unknown server in BENCH_SERVERS: $s" >&2
            exit 2
            ;;
    esac
done
case $ORTHANC_NODELAY in
    0 | 1) ;;
    *)
        echo "ingest.sh: BENCH_ORTHANC_NODELAY must be 0 or 1, got '$ORTHANC_NODELAY'" >&2
        exit 2
        ;;
esac
case $CLIENT in
    storescu | dcmsend) ;;
    *)
        echo "ingest.sh: BENCH_CLIENT must be storescu or dcmsend, got '$CLIENT'" >&2
        exit 2
        ;;
esac

log() { printf 'ingest.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------------------------------
# Clean-up: every server started is recorded here and stopped on exit.
SERVER_PIDS=()
CLIENT_PIDS=()
TMP_DIRS=()
cleanup() {
    local pid
    for pid in "${CLIENT_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${SERVER_PIDS[@]}"; do
        stop_pid "$pid"
    done
    if [[ $KEEP != 1 ]]; then
        local d
        for d in "${TMP_DIRS[@]}"; do
            rm -rf -- "$d"
        done
    fi
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM

# Stops one process: SIGTERM, up to 30 s for a clean shutdown, then SIGKILL.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid still running after 30 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

forget_pid() {
    local pid=$1 p keep=()
    for p in "${SERVER_PIDS[@]}"; do
        [[ $p == "$pid" ]] || keep+=("$p")
    done
    SERVER_PIDS=("${keep[@]+"${keep[@]}"}")
}

# ---------------------------------------------------------------------------------------
# Tools.
APT_UPDATED=0
apt_install() {
    local pkg=$1
    [[ $NO_INSTALL == 1 ]] && die "$pkg is missing (BENCH_NO_INSTALL=1): install it first"
    [[ $(id -u) == 0 ]] || die "$pkg is missing: install it (apt-get install $pkg) or run as root"
    if ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        log "apt-get update"
        apt-get update -qq >/dev/null
        APT_UPDATED=1
    fi
    log "apt-get install $pkg"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null; then
        [[ $APT_UPDATED == 1 ]] || {
            apt-get update -qq >/dev/null
            APT_UPDATED=1
        }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null ||
            die "apt-get install $pkg failed"
    fi
}

ensure_tools() {
    command -v python3 >/dev/null || die "python3 is required"
    command -v curl >/dev/null || apt_install curl
    if ! python3 -c 'import pydicom, numpy' 2>/dev/null; then
        [[ $NO_INSTALL == 1 ]] && die "pydicom/numpy missing (BENCH_NO_INSTALL=1)"
        log "pip install pydicom numpy"
        python3 -m pip install --quiet pydicom numpy || die "pip install pydicom numpy failed"
    fi
    command -v "$CLIENT" >/dev/null || apt_install dcmtk
    # pynetdicom installs Python programs named storescu etc.; use DCMTK's own.
    for c in $(type -ap "$CLIENT"); do
        if "$c" --version 2>/dev/null | grep -q '\$dcmtk:'; then CLIENT=$c; break; fi
    done
    if [[ " $SERVERS " == *" orthanc "* ]] && ! command -v "$ORTHANC_BIN" >/dev/null; then
        apt_install orthanc
        command -v "$ORTHANC_BIN" >/dev/null || die "$ORTHANC_BIN not found after installing orthanc"
    fi
}

find_kade() {
    if [[ -n ${KADE_BIN:-} ]]; then
        [[ -x $KADE_BIN ]] || die "KADE_BIN=$KADE_BIN is not executable"
        KADE=$KADE_BIN
        KADE_WHICH="KADE_BIN"
        return
    fi
    local dirs=() profile d
    [[ -n ${CARGO_TARGET_DIR:-} ]] && dirs+=("$CARGO_TARGET_DIR")
    dirs+=("$REPO/target" "$HOME/.cache/kade-target")
    for profile in release debug; do
        for d in "${dirs[@]}"; do
            if [[ -x $d/$profile/kade ]]; then
                KADE=$d/$profile/kade
                KADE_WHICH="$profile build"
                return
            fi
        done
    done
    die "no kade binary found: build one (cargo build --release --bin kade) or set KADE_BIN"
}

# A free TCP port on 127.0.0.1 (the kernel picks it; a tiny race is acceptable here).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

now_ns() { date +%s%N; }

vm_hwm_kb() {
    awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0
}

# Prints a JSON field of stdin (empty if absent or not JSON).
json_field() {
    python3 -c 'import json,sys
try: print(json.load(sys.stdin).get(sys.argv[1], ""))
except Exception: print("")' "$1"
}

strip_ansi() { sed -E 's/\x1b\[[0-9;]*m//g'; }

# ---------------------------------------------------------------------------------------
# Servers. Each start_* sets SRV_PID, SRV_PORT, SRV_AE, SRV_LOG (stderr or combined log).

start_kade() {
    local dir=$1 i line
    "$KADE" --data-dir "$dir/data" peer add "$CALLING_AE" --host "$HOST" --allow echo,store \
        >"$dir/peer.log" 2>&1 || {
        cat "$dir/peer.log" >&2
        die "kade peer add failed"
    }
    "$KADE" --data-dir "$dir/data" serve --port 0 --bind "$HOST" \
        >"$dir/kade.out" 2>"$dir/kade.err" &
    SRV_PID=$!
    SERVER_PIDS+=("$SRV_PID")
    SRV_AE=KADE
    SRV_LOG=$dir/kade.err
    SRV_PORT=
    for ((i = 0; i < 600; i++)); do
        line=$(grep -m1 'DICOM listening on' "$dir/kade.out" 2>/dev/null || true)
        if [[ -n $line ]]; then
            # kade: DICOM listening on 127.0.0.1:PORT (AE KADE)
            SRV_PORT=$(sed -E 's/.* on [^ ]*:([0-9]+) .*/\1/' <<<"$line")
            SRV_AE=$(sed -E 's/.*\(AE ([^)]*)\).*/\1/' <<<"$line")
            break
        fi
        kill -0 "$SRV_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z $SRV_PORT ]]; then
        strip_ansi <"$dir/kade.err" | tail -20 >&2
        die "kade did not start listening"
    fi
}

kade_count() {
    "$KADE" --data-dir "$1/data" stats --json 2>>"$1/stats.err" | json_field instances
}

start_orthanc() {
    local dir=$1 i sync_line=""
    local dicom_port http_port
    dicom_port=$(free_port)
    http_port=$(free_port)
    while [[ $http_port == "$dicom_port" ]]; do http_port=$(free_port); done
    if [[ -n ${ORTHANC_SYNC_STORAGE:-} ]]; then
        sync_line="\"SyncStorageArea\": ${ORTHANC_SYNC_STORAGE},"
    fi
    mkdir -p "$dir/storage" "$dir/index"
    cat >"$dir/orthanc.json" <<EOF
{
  "Name": "KadeBench",
  "StorageDirectory": "$dir/storage",
  "IndexDirectory": "$dir/index",
  "DicomAet": "ORTHANC",
  "DicomPort": $dicom_port,
  "HttpPort": $http_port,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomCheckCalledAet": false,
  "DicomAlwaysAllowStore": true,
  $sync_line
  "Plugins": []
}
EOF
    # DCMTK (inside Orthanc) disables Nagle's algorithm only when TCP_NODELAY is set.
    if [[ $ORTHANC_NODELAY == 1 ]]; then
        TCP_NODELAY=1 "$ORTHANC_BIN" "$dir/orthanc.json" >"$dir/orthanc.log" 2>&1 &
    else
        env -u TCP_NODELAY "$ORTHANC_BIN" "$dir/orthanc.json" >"$dir/orthanc.log" 2>&1 &
    fi
    SRV_PID=$!
    SERVER_PIDS+=("$SRV_PID")
    SRV_AE=ORTHANC
    SRV_PORT=$dicom_port
    SRV_LOG=$dir/orthanc.log
    ORTHANC_HTTP=http://$HOST:$http_port
    for ((i = 0; i < 600; i++)); do
        curl -sf "$ORTHANC_HTTP/system" >/dev/null 2>&1 && return 0
        kill -0 "$SRV_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -20 "$dir/orthanc.log" >&2
    die "Orthanc did not answer on $ORTHANC_HTTP/system"
}

orthanc_count() {
    curl -sf "$ORTHANC_HTTP/statistics" 2>/dev/null | json_field CountInstances
}

# ---------------------------------------------------------------------------------------
# One measured run: server $1, $2 associations. Appends a row to RESULTS.
RESULTS=()
FAILED_RUNS=0

run_one() {
    local server=$1 k=$2 dir i pid start end secs hwm stored errors=0 rc_bad=0
    dir=$(mktemp -d "$WORK_PARENT/kade-bench-run.XXXXXX")
    TMP_DIRS+=("$dir")

    # Flush what earlier runs left dirty, so it is not written back during this one.
    sync
    case $server in
        kade) start_kade "$dir" ;;
        orthanc) start_orthanc "$dir" ;;
    esac
    log "$server: pid $SRV_PID, AE $SRV_AE, port $SRV_PORT; sending $INSTANCES instances over $k association(s)"

    # Split the sorted list into k contiguous parts (whole series when k divides them).
    split -n "l/$k" -d -a 3 "$LIST" "$dir/part."
    # Keep the client's reads out of the measurement: the files come from the page cache.
    xargs -a "$LIST" cat >/dev/null

    local pids=() parts=() part files
    for part in "$dir"/part.*; do
        [[ -s $part ]] && parts+=("$part")
    done
    local client_args
    case ${CLIENT##*/} in
        storescu) client_args=(-aet "$CALLING_AE" -aec "$SRV_AE" -nh -to 30 -ta 30 -td 600) ;;
        dcmsend) client_args=(-aet "$CALLING_AE" -aec "$SRV_AE" -ma -nh -to 30 -ta 30 -td 600) ;;
    esac

    start=$(now_ns)
    for part in "${parts[@]}"; do
        mapfile -t files <"$part"
        TCP_NODELAY=1 "$CLIENT" "${client_args[@]}" "$HOST" "$SRV_PORT" "${files[@]}" \
            >"$part.log" 2>&1 &
        pids+=("$!")
    done
    CLIENT_PIDS=("${pids[@]}")
    for pid in "${pids[@]}"; do
        wait "$pid" || rc_bad=$((rc_bad + 1))
    done
    end=$(now_ns)
    CLIENT_PIDS=()

    hwm=$(vm_hwm_kb "$SRV_PID")
    case $server in
        kade) stored=$(kade_count "$dir" || true) ;;
        orthanc) stored=$(orthanc_count || true) ;;
    esac
    for part in "${parts[@]}"; do
        i=$(grep -c '^[EF]:' "$part.log" || true)
        errors=$((errors + i))
    done

    stop_pid "$SRV_PID"
    forget_pid "$SRV_PID"
    # Kade's index can also be read once the server has stopped.
    if [[ $server == kade && -z $stored ]]; then stored=$(kade_count "$dir" || true); fi

    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
    RESULTS+=("$(awk -v s="$server" -v k="$k" -v n="$INSTANCES" -v a="$start" -v b="$end" \
        -v bytes="$TOTAL_BYTES" -v hwm="$hwm" -v st="${stored:-?}" -v e="$errors" \
        'BEGIN { t = (b - a) / 1e9;
                 printf "| %s | %d | %d | %.2f | %.1f | %.1f | %.1f | %s | %d |",
                        s, k, n, t, n / t, bytes / 1e6 / t, hwm * 1024 / 1e6, st, e }')")
    log "$server x$k: ${secs}s, stored ${stored:-?}/$INSTANCES, client errors $errors"

    if [[ ${stored:-} != "$INSTANCES" || $errors -gt 0 || $rc_bad -gt 0 ]]; then
        FAILED_RUNS=$((FAILED_RUNS + 1))
        log "$server x$k: FAILED (stored ${stored:-?} of $INSTANCES, $errors client error lines, $rc_bad client(s) exited non-zero)"
        for part in "${parts[@]}"; do
            if grep -q '^[EF]:' "$part.log"; then
                log "client log $(basename "$part").log (first error lines):"
                grep -m5 '^[EF]:' "$part.log" >&2 || true
            fi
        done
        log "server log excerpt ($SRV_LOG):"
        strip_ansi <"$SRV_LOG" | grep -iE 'warn|error|fail|reject|panic|E[0-9]{4} ' | tail -20 >&2 || true
    fi
    if [[ $KEEP == 1 ]]; then
        log "kept $dir"
    else
        rm -rf -- "$dir"
    fi
}

# ---------------------------------------------------------------------------------------
ensure_tools
if [[ " $SERVERS " == *" kade "* ]]; then
    find_kade
    log "kade: $KADE ($KADE_WHICH)"
fi

DATA_DIR=$DATA_ROOT/ct-$INSTANCES-i-$STUDIES-st-$SERIES-se
python3 "$HERE/gen_ct.py" --out "$DATA_DIR" --instances "$INSTANCES" \
    --studies "$STUDIES" --series "$SERIES" >&2
mkdir -p "$WORK_PARENT"
LIST_DIR=$(mktemp -d "$WORK_PARENT/kade-bench-list.XXXXXX")
TMP_DIRS+=("$LIST_DIR")
LIST=$LIST_DIR/files.txt
find "$DATA_DIR" -maxdepth 1 -name '*.dcm' -type f | LC_ALL=C sort >"$LIST"
n_files=$(wc -l <"$LIST")
[[ $n_files == "$INSTANCES" ]] || die "expected $INSTANCES files in $DATA_DIR, found $n_files"
TOTAL_BYTES=$(xargs -a "$LIST" stat -c %s | awk '{ s += $1 } END { print s }')

for server in $SERVERS; do
    for k in $ASSOCIATIONS; do
        run_one "$server" "$k"
    done
done

# ---------------------------------------------------------------------------------------
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
disk_of() { df -hT "$1" | awk 'NR == 2 { printf "%s (%s, %s, %s free, on %s)", $1, $2, $3, $5, $7 }'; }

echo
echo "## Ingest benchmark: Kade vs Orthanc (C-STORE over DICOM, 127.0.0.1)"
echo
echo "| server | associations | instances | seconds | instances/s | MB/s | peak RSS MB | stored | client errors |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${RESULTS[@]}"
echo
awk -v n="$INSTANCES" -v b="$TOTAL_BYTES" -v st="$STUDIES" -v se="$SERIES" 'BEGIN {
    printf "- Data set: %d CT instances, 512x512x16 bit, Explicit VR Little Endian, %d study(ies), %d series, %.1f MB\n",
           n, st, se, b / 1e6 }'
echo "- Client: $("$CLIENT" --version 2>&1 | head -1 | sed -E 's/^.dcmtk: //; s/ .$//'), TCP_NODELAY=1; K associations = K concurrent $CLIENT processes, one contiguous part of the sorted file list each"
echo "- Machine: $(nproc) CPU(s), ${cpu:-unknown CPU}, $mem RAM, $(uname -sr)"
echo "- Server storage disk: $(disk_of "$WORK_PARENT")"
echo "- Data set disk: $(disk_of "$DATA_DIR")"
if [[ " $SERVERS " == *" kade "* ]]; then
    echo "- Kade: $("$KADE" --version 2>&1 | head -1), $KADE_WHICH ($KADE), SQLite index + local file storage, default settings"
fi
if [[ " $SERVERS " == *" orthanc "* ]]; then
    echo "- Orthanc: $("$ORTHANC_BIN" --version 2>&1 | head -1), default SQLite index + file storage, no plugins, otherwise default settings${ORTHANC_SYNC_STORAGE:+ except SyncStorageArea=$ORTHANC_SYNC_STORAGE}"
    if [[ $ORTHANC_NODELAY == 1 ]]; then
        echo "- Orthanc ran with TCP_NODELAY=1 in its environment (Nagle off on its DICOM sockets, as Kade does by itself). Its packaged service runs without it; BENCH_ORTHANC_NODELAY=0 measures that, where a single association is far slower (delayed-ACK waits)."
    else
        echo "- Orthanc ran without TCP_NODELAY (as its packaged service does): Nagle's algorithm stays on for its DICOM sockets, so C-STORE responses can wait for delayed ACKs."
    fi
fi
echo "- Durability: Kade answers a C-STORE only once the object file, its directories and the SQLite index commit are fsynced. Orthanc's SyncStorageArea (default true since 1.7.4) fsyncs each stored file but not the directories, and its SQLite index is not synced per instance; Orthanc releases before 1.7.4 (or SyncStorageArea=false) do not fsync at all. The two are therefore not doing the same amount of durable work per instance."
echo "- MB = 10^6 bytes of DICOM files sent; peak RSS = VmHWM of the server process at the end of the run. Each run starts the server on an empty storage directory."

if ((FAILED_RUNS > 0)); then
    log "$FAILED_RUNS run(s) did not store every instance; see the messages above"
    exit 1
fi
