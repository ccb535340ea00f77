#!/usr/bin/env python3
"""DIMSE query/retrieve benchmark: Kade against Orthanc, same machine, same data.

Generates synthetic studies (the generator of bench/dicomweb.py), starts each server in turn on
an empty temporary directory, loads the same files into it over DIMSE (DCMTK storescu, 4
associations), then measures with pynetdicom as the SCU (one association per measurement, TCP_NODELAY, its reactor polling without sleeps):

  - C-FIND STUDY level (Study Root) latency, p50 / p95 of sequential queries, from sending the
    request to the final response, for PatientID (exact), PatientName (prefix wildcard, ~1 % of
    the studies), StudyDate (a range holding ~10 %) and ModalitiesInStudy=CT (a third of the
    studies); both servers must return the same number of matches;
  - C-MOVE of one study of --move-instances 512x512 16-bit CT instances to a DCMTK storescp
    started here (which receives and discards: --ignore), instances/s, best of 3;
  - C-FIND latency again with bench/rawfind.py, a client that reads the responses without
    decoding the matches: the servers' own time (for large answers findscu's and pynetdicom's
    decoding of each match is most of what they measure).

Kade runs with its defaults (SQLite + files) and a peer entry for the SCU; Orthanc with
LimitFindResults/LimitFindInstances 0 and the storescp as a known modality, otherwise defaults.

Needs: DCMTK (storescu, storescp), pydicom, numpy, requests, pynetdicom; for Orthanc:
apt-get install orthanc orthanc-dicomweb.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dicomweb as dw  # noqa: E402  (the generator and the server wrappers)
from rawfind import RawFind  # noqa: E402

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    StudyRootQueryRetrieveInformationModelFind as FIND,
    StudyRootQueryRetrieveInformationModelMove as MOVE,
)

QUERIES = [
    ("PatientID= exact", {"PatientID": "PID000123"}),
    ("PatientName=PN12* wildcard", {"PatientName": "PN12*"}),
    ("StudyDate=20240301-20240405 range", {"StudyDate": "20240301-20240405"}),
    ("ModalitiesInStudy=CT", {"ModalitiesInStudy": "CT"}),
]


def identifier(keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for k in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "ModalitiesInStudy",
              "StudyDescription", "AccessionNumber", "NumberOfStudyRelatedInstances"):
        setattr(ds, k, "")
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def associate(port, called, context):
    """An association of BENCHSCU with TCP_NODELAY on its socket (pynetdicom does not set it,
    and Nagle's algorithm would add a delayed-ACK wait to every request of both servers)."""
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    assoc = ae.associate(dw.HOST, port, ae_title=called)
    if not assoc.is_established:
        sys.exit(f"qr.py: {called} refused the association")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # pynetdicom's reactor sleeps 1 ms between polls, which would add about 1 ms per pending
    # response to both servers; poll without sleeping while measuring.
    assoc.dul._run_loop_delay = 0
    return assoc


def status_of(status, called):
    code = getattr(status, "Status", None)
    if code is None:
        sys.exit(f"qr.py: {called}: the association ended without a response status")
    return code


def find_latency(port, called, keys, n, warmup):
    assoc = associate(port, called, FIND)
    times, count = [], 0
    try:
        for i in range(n + warmup):
            t0 = time.perf_counter()
            matches = 0
            for status, ds in assoc.send_c_find(identifier(keys), FIND):
                if status_of(status, called) in (0xFF00, 0xFF01):
                    matches += 1
            dt = (time.perf_counter() - t0) * 1000
            if i >= warmup:
                times.append(dt)
            count = matches
    finally:
        assoc.release()
    times.sort()
    return {"p50": dw.pct(times, 50), "p95": dw.pct(times, 95), "count": count}


def raw_latency(port, called, keys, n, warmup):
    """p50 / p95 with bench/rawfind.py, a client that reads the matches without decoding
    them: the servers' own latency."""
    c = RawFind(dw.HOST, port, called)
    times, count = [], 0
    try:
        for i in range(n + warmup):
            count, status, dt = c.find(identifier(keys))
            if status != 0:
                sys.exit(f"qr.py: {called}: C-FIND ended with status {status:#06x}")
            if i >= warmup:
                times.append(dt * 1000)
    finally:
        c.release()
    times.sort()
    return {"p50": dw.pct(times, 50), "p95": dw.pct(times, 95), "count": count}


def findscu_mean(port, called, keys, n):
    """Mean C-FIND latency with DCMTK findscu (a native client): findscu --repeat repeats the
    query on one association, so (time(n + 1 queries) - time(1 query)) / n leaves out the
    process start and the association set-up."""
    findscu = dw.dcmtk("findscu")
    args = [findscu, "-S", "-aet", "BENCHSCU", "-aec", called, "-k", "QueryRetrieveLevel=STUDY"]
    for k in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "ModalitiesInStudy"):
        args += ["-k", f"{k}={keys[k]}" if k in keys else k]
    env = {**os.environ, "TCP_NODELAY": "1"}

    def run(repeat):
        t0 = time.perf_counter()
        subprocess.run(args + ["--repeat", str(repeat), dw.HOST, str(port)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        return time.perf_counter() - t0

    one = min(run(1) for _ in range(3))
    many = min(run(n + 1) for _ in range(2))
    return max(0.0, (many - one) / n * 1000)


def move_rate(port, called, study, dest, expect, repeat=3):
    best = 0.0
    for _ in range(repeat):
        assoc = associate(port, called, MOVE)
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study
        t0 = time.perf_counter()
        final = None
        for status, _ in assoc.send_c_move(ds, dest, MOVE):
            if status_of(status, called) not in (0xFF00, 0xFF01):
                final = status
        dt = time.perf_counter() - t0
        assoc.release()
        done = int(getattr(final, "NumberOfCompletedSuboperations", 0) or 0)
        if final is None or final.Status != 0 or done != expect:
            sys.exit(f"qr.py: {called}: C-MOVE ended with {final!r}")
        best = max(best, expect / dt)
    return best


class StoreScp:
    """DCMTK storescp that accepts and discards everything."""

    def __init__(self, work):
        self.port = dw.free_port()
        self.dir = os.path.join(work, "storescp")
        os.makedirs(self.dir)
        self.proc = subprocess.Popen(
            [dw.dcmtk("storescp"), "--aetitle", "STORESCP", "--ignore", "--max-pdu", "65536",
             str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=self.dir, env={**os.environ, "TCP_NODELAY": "1"})
        time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] + """
Examples:
  cargo build --release --bin kade
  python3 bench/qr.py --studies 2000
  python3 bench/qr.py --studies 10000 --move-instances 1000
""")
    ap.add_argument("--studies", type=int, default=2000)
    ap.add_argument("--per-study", type=int, default=1)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--move-instances", type=int, default=1000)
    ap.add_argument("--kade-bin", default=dw.default_kade())
    ap.add_argument("--orthanc-bin", default=shutil.which("Orthanc") or "Orthanc")
    ap.add_argument("--skip-orthanc", action="store_true")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    if not (a.kade_bin and os.access(a.kade_bin, os.X_OK)):
        ap.error("no kade binary: cargo build --release --bin kade, or --kade-bin PATH")
    work = tempfile.mkdtemp(prefix="kade-qr-", dir=a.work)
    scp = None
    servers = []
    try:
        data = dw.generate(work, a.studies, a.per_study, a.move_instances, 0,
                           int(time.time() * 1000))
        scp = StoreScp(work)
        results, versions = {}, {}
        plan = [("Kade", lambda: dw.Kade(a.kade_bin, work))]
        if not a.skip_orthanc:
            plan.append(("Orthanc", lambda: dw.Orthanc(
                a.orthanc_bin, work,
                {"DicomModalities": {"storescp": ["STORESCP", dw.HOST, scp.port],
                                     "benchscu": ["BENCHSCU", dw.HOST, 104]},
                 "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True,
                 "DicomScpTimeout": 600})))
        for name, start in plan:
            server = start()
            servers.append(server)
            versions[name] = server.version
            if name == "Kade":
                data_dir = os.path.join(server.dir, "data")
                for args in (["BENCHSCU", "--host", dw.HOST, "--allow", "echo,find,move",
                              "--max-matches", "100000"],
                             ["STORESCP", "--host", dw.HOST, "--port", str(scp.port),
                              "--allow", "echo"]):
                    subprocess.run([a.kade_bin, "--data-dir", data_dir, "peer", "add", *args],
                                   check=True, capture_output=True)
            dw.log(f"{name}: loading {len(data['search']) + len(data['stow'])} instances")
            dw.load(data["search"] + data["stow"], server.dicom, server.called)
            r = {}
            for label, keys in QUERIES:
                r[label] = find_latency(server.dicom, server.called, keys, a.requests, a.warmup)
                r[label]["findscu"] = findscu_mean(server.dicom, server.called, keys, a.requests)
                r[label]["raw"] = raw_latency(server.dicom, server.called, keys, a.requests,
                                              a.warmup)
                dw.log(f"{name}: C-FIND {label}: {r[label]}")
            r["move"] = move_rate(server.dicom, server.called, data["stow_study"], "STORESCP",
                                  len(data["stow"]))
            dw.log(f"{name}: C-MOVE {r['move']:.0f} instances/s")
            r["rss"] = server.hwm()
            results[name] = r
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)
        names = list(results)
        print(f"\n## DIMSE query/retrieve ({a.studies} studies, "
              f"{time.strftime('%Y-%m-%d %H:%M')})\n")
        print("| measurement | " + " | ".join(names) + (" | Kade/Orthanc |" if len(names) == 2 else " |"))
        print("|---" * (len(names) + 1 + (len(names) == 2)) + "|")
        for label, _ in QUERIES:
            cells = [f"{results[n][label]['p50']:.1f} / {results[n][label]['p95']:.1f} "
                     f"({results[n][label]['count']})" for n in names]
            ratio = ""
            if len(names) == 2:
                ratio = f" | {results['Kade'][label]['p50'] / results['Orthanc'][label]['p50']:.2f}x"
            print(f"| C-FIND {label}, p50 / p95 ms (matches) | " + " | ".join(cells) + ratio + " |")
        for label, _ in QUERIES:
            cells = [f"{results[n][label]['findscu']:.1f}" for n in names]
            ratio = ""
            if len(names) == 2 and results["Orthanc"][label]["findscu"] > 0:
                ratio = (f" | {results['Kade'][label]['findscu'] / results['Orthanc'][label]['findscu']:.2f}x")
            print(f"| C-FIND {label}, findscu mean ms | " + " | ".join(cells) + ratio + " |")
        for label, _ in QUERIES:
            cells = [f"{results[n][label]['raw']['p50']:.1f} / {results[n][label]['raw']['p95']:.1f}"
                     for n in names]
            ratio = ""
            if len(names) == 2:
                k, o = results["Kade"][label]["raw"], results["Orthanc"][label]["raw"]
                ratio = f" | {k['p50'] / o['p50']:.2f}x / {k['p95'] / o['p95']:.2f}x"
            print(f"| C-FIND {label}, raw client p50 / p95 ms | " + " | ".join(cells) + ratio + " |")
        cells = [f"{results[n]['move']:.0f}" for n in names]
        ratio = (f" | {results['Kade']['move'] / results['Orthanc']['move']:.2f}x"
                 if len(names) == 2 else "")
        print(f"| C-MOVE {len(data['stow'])} x 512x512 CT to storescp, instances/s | "
              + " | ".join(cells) + ratio + " |")
        print("| peak RSS, MB | " + " | ".join(f"{results[n]['rss']:.0f}" for n in names)
              + (" | |" if len(names) == 2 else " |"))
        print(f"\n- Versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()))
        print(f"- p50 / p95: pynetdicom SCU, one association per measurement, {a.requests} queries "
              f"after {a.warmup} warm-up; time to the final C-FIND response (pynetdicom's own "
              f"decoding costs about 1.7 ms per match on this machine, for both servers)")
        print(f"- raw client: bench/rawfind.py, which reads the responses without decoding the "
              f"matches (the servers' own time), {a.requests} queries after {a.warmup} warm-up")
        print(f"- findscu mean: DCMTK findscu --repeat {a.requests + 1} minus --repeat 1, "
              f"divided by {a.requests}")
        if len(names) == 2:
            for label, _ in QUERIES:
                if results["Kade"][label]["count"] != results["Orthanc"][label]["count"]:
                    print(f"- WARNING: {label}: match counts differ")
    finally:
        for s in servers:
            s.stop()
        if scp:
            scp.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
