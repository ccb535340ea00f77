#!/usr/bin/env python3
"""What the WADO-RS retrieval benchmark's client costs: one study retrieved from Kade over
HTTPS by the Python clients bench/dicomweb.py uses (requests, http.client), with the client's
and the server's CPU seconds per GB.

Starts Kade (release build) on an empty temporary directory, loads the given DICOM files over
DIMSE (4 storescu associations), retrieves their study twice with each client and prints
MB/s and CPU per GB. A client that spends c s of CPU per GB on one core cannot take more
than 1/c GB/s from any server.

Examples:
  cargo build --release --bin kade
  python3 bench/wadoclient.py /tmp/kade-bench-data/exchange-a-2000   # bench/exchange.sh's data
"""
import argparse
import http.client
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dicomweb as dw  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("files", help="a directory of .dcm files of one study")
    ap.add_argument("--count", type=int, default=1000, help="files to load (default 1000)")
    ap.add_argument("--kade-bin", default=dw.default_kade())
    a = ap.parse_args()
    files = sorted(os.path.join(a.files, f) for f in os.listdir(a.files)
                   if f.endswith(".dcm"))[:a.count]
    if not files:
        sys.exit(f"wadoclient.py: no .dcm files in {a.files}")
    study = subprocess.run([dw.dcmtk("dcmdump"), "+P", "StudyInstanceUID", files[0]],
                           capture_output=True, text=True, check=True).stdout
    study = study.split("[", 1)[1].split("]", 1)[0]
    work = tempfile.mkdtemp(prefix="kade-wadoclient-")
    k = dw.Kade(a.kade_bin, work)
    try:
        dw.load(files, k.dicom, k.called)
        accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        for client in ["requests", "requests", "http.client", "http.client"]:
            before = resource.getrusage(resource.RUSAGE_SELF)
            server0, t0, size = dw.process_cpu_s(k.proc.pid), time.perf_counter(), 0
            if client == "requests":
                r = k.session.get(k.base + f"/studies/{study}", stream=True, headers=accept)
                for chunk in r.iter_content(1 << 20):
                    size += len(chunk)
            else:
                conn = http.client.HTTPSConnection(dw.HOST, k.http_port, context=k.ssl)
                conn.request("GET", f"/dicom-web/studies/{study}", headers={**k.auth, **accept})
                resp = conn.getresponse()
                while True:
                    d = resp.read(1 << 20)
                    if not d:
                        break
                    size += len(d)
                conn.close()
            dt = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_SELF)
            gb = size / 1e9
            own = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            print(f"{client}: {size / 1e6:.0f} MB in {dt:.2f} s = {size / 1e6 / dt:.0f} MB/s; "
                  f"client CPU {own / gb:.2f} s/GB; "
                  f"server CPU {(dw.process_cpu_s(k.proc.pid) - server0) / gb:.2f} s/GB")
    finally:
        k.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
