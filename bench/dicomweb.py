#!/usr/bin/env python3
"""DICOMweb benchmark: Kade against Orthanc + its DICOMweb plugin, same machine, same data.

Generates synthetic studies with pydicom, loads them into both servers over DIMSE (DCMTK
storescu, 4 parallel associations), then measures:
  - QIDO-RS /studies latency (p50/p95) for PatientID, PatientName wildcard, StudyDate range and
    ModalitiesInStudy=CT (a large answer),
  - WADO-RS /metadata latency for a 100-instance series,
  - STOW-RS ingest (instances/s, 4 parallel single-instance requests, 512x512 CT),
  - WADO-RS retrieval of a whole study (MB/s) and Kade's peak RSS.
Kade is reached over HTTPS (its only listener) with a bearer token; Orthanc over plain HTTP on
loopback without authentication, which favours Orthanc.

Usage:
  cargo build --release --bin kade
  python3 bench/dicomweb.py --studies 2000
  python3 bench/dicomweb.py --studies 500 --skip-orthanc
Needs: DCMTK (apt-get install dcmtk), pydicom, numpy, requests; for Orthanc:
apt-get install orthanc orthanc-dicomweb.
"""

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"
MODALITIES = ["CT", "MR", "CR"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dcmtk(tool):
    """DCMTK's own tool (pynetdicom installs programs with the same names)."""
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
        p = os.path.join(d, tool)
        if os.path.isfile(p):
            out = subprocess.run([p, "--version"], capture_output=True, text=True).stdout
            if "$dcmtk:" in out:
                return p
    sys.exit(f"DCMTK {tool} not found: apt-get install dcmtk")


def instance(study, series, n, patient, modality, date, size):
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName = patient
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = date, "120000", "A" + patient[0][3:]
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, n
    ds.StudyDescription, ds.SeriesDescription = "Bench", "Bench series"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(size * size, dtype=np.uint16) % 4096).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def generate(dir_, studies, per_study):
    """Small studies for the search benchmark, plus a 100-instance series."""
    files = []
    for i in range(studies):
        study, series = generate_uid(), generate_uid()
        patient = (f"PID{i:06d}", f"NAME{i % 997:03d}^GIVEN{i}")
        date = f"2024{1 + i % 12:02d}{1 + i % 28:02d}"
        for n in range(per_study):
            ds = instance(study, series, n + 1, patient, MODALITIES[i % 3], date, 64)
            f = os.path.join(dir_, f"s{i}_{n}.dcm")
            ds.save_as(f, enforce_file_format=True)
            files.append(f)
    big_study, big_series = generate_uid(), generate_uid()
    for n in range(100):
        ds = instance(big_study, big_series, n + 1, ("PIDBIG", "BIG^SERIES"), "CT", "20230101", 64)
        f = os.path.join(dir_, f"big_{n}.dcm")
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
    return files, (big_study, big_series)


def load(files, port, aet, called):
    storescu = dcmtk("storescu")
    parts = [files[i::4] for i in range(4)]
    t0 = time.time()
    procs = []
    for p in parts:
        procs.append(subprocess.Popen(
            [storescu, "-aet", aet, "-aec", called, "-nh", "127.0.0.1", str(port)] + p,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TCP_NODELAY": "1"}))
    for pr in procs:
        _, err = pr.communicate()
        if pr.returncode != 0:
            sys.exit(f"storescu failed: {err.decode()[-500:]}")
    return time.time() - t0


class Kade:
    name = "Kade"

    def __init__(self, binary, work):
        self.dir = os.path.join(work, "kade")
        self.dicom, self.http = free_port(), free_port()
        subprocess.run([binary, "--data-dir", self.dir, "peer", "add", "STORESCU", "--host",
                        "127.0.0.1", "--allow", "echo,store"], check=True, capture_output=True)
        self.proc = subprocess.Popen(
            [binary, "--data-dir", self.dir, "serve", "--port", str(self.dicom),
             "--http-port", str(self.http)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "KADE_LOG": "warn"}, text=True)
        self.token = None
        for line in self.proc.stdout:
            if line.startswith("kade: admin token "):
                self.token = line.split()[-1]
            if line.startswith("kade: DICOM listening"):
                break
        self.base = f"https://127.0.0.1:{self.http}/dicom-web"
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = os.path.join(self.dir, "tls", "cert.pem")
        self.session.headers["Authorization"] = f"Bearer {self.token}"

    def peak_rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class Orthanc:
    name = "Orthanc"

    def __init__(self, work):
        self.dir = os.path.join(work, "orthanc")
        os.makedirs(self.dir)
        self.dicom, self.http = free_port(), free_port()
        plugin = next((p for p in ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                                   "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so"]
                       if os.path.exists(p)), None)
        if plugin is None:
            out = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True)
            plugin = next((l for l in out.stdout.split() if l.endswith(".so")), None)
        if plugin is None:
            sys.exit("Orthanc's DICOMweb plugin not found: apt-get install orthanc-dicomweb")
        cfg = {
            "Name": "bench", "StorageDirectory": os.path.join(self.dir, "db"),
            "IndexDirectory": os.path.join(self.dir, "db"), "HttpPort": self.http,
            "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [plugin], "LimitFindResults": 0,
            "LimitFindInstances": 0, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        with open(os.path.join(self.dir, "orthanc.json"), "w") as f:
            json.dump(cfg, f)
        self.proc = subprocess.Popen(["Orthanc", os.path.join(self.dir, "orthanc.json")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        self.base = f"http://127.0.0.1:{self.http}/dicom-web"
        self.session = requests.Session()
        self.session.trust_env = False
        for _ in range(100):
            try:
                if self.session.get(f"http://127.0.0.1:{self.http}/system").ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)

    def peak_rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def latency(server, path, params, n=30):
    times, count = [], None
    for i in range(n + 3):
        t0 = time.perf_counter()
        r = server.session.get(server.base + path, params=params,
                               headers={"Accept": "application/dicom+json"})
        dt = (time.perf_counter() - t0) * 1000
        if r.status_code not in (200, 204):
            sys.exit(f"{server.name} {path} {params}: {r.status_code} {r.text[:200]}")
        count = len(r.json()) if r.status_code == 200 else 0
        if i >= 3:  # warm-up
            times.append(dt)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1], count


def stow(server, files):
    def one(f):
        with open(f, "rb") as fh:
            body = b"--BB\r\nContent-Type: application/dicom\r\n\r\n" + fh.read() + b"\r\n--BB--\r\n"
        r = server.session.post(server.base + "/studies", data=body, headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=BB',
            "Accept": "application/dicom+json"})
        if r.status_code != 200:
            raise RuntimeError(f"{server.name} STOW {r.status_code} {r.text[:200]}")
    t0 = time.time()
    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(one, files))
    return len(files) / (time.time() - t0)


def retrieve(server, study):
    t0 = time.time()
    r = server.session.get(server.base + f"/studies/{study}", stream=True, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    n = sum(len(c) for c in r.iter_content(1 << 20))
    if r.status_code != 200:
        sys.exit(f"{server.name} retrieve {r.status_code}")
    return n / 1e6 / (time.time() - t0), n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Example: python3 bench/dicomweb.py --studies 2000")
    ap.add_argument("--studies", type=int, default=2000, help="small studies to index (default 2000)")
    ap.add_argument("--per-study", type=int, default=2, help="instances per small study")
    ap.add_argument("--stow", type=int, default=200, help="512x512 instances sent with STOW-RS")
    ap.add_argument("--kade-bin", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "kade"))
    ap.add_argument("--skip-orthanc", action="store_true")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kade-bench-")
    try:
        print(f"generating {a.studies} studies x {a.per_study} + a 100-instance series ...", flush=True)
        data = os.path.join(work, "data")
        os.makedirs(data)
        files, (big_study, big_series) = generate(data, a.studies, a.per_study)
        stow_dir = os.path.join(work, "stow")
        os.makedirs(stow_dir)
        stow_study, stow_series = generate_uid(), generate_uid()
        stow_files = []
        for n in range(a.stow):
            ds = instance(stow_study, stow_series, n + 1, ("PIDSTOW", "STOW^BENCH"), "CT", "20220101", 512)
            f = os.path.join(stow_dir, f"{n}.dcm")
            ds.save_as(f, enforce_file_format=True)
            stow_files.append(f)
        servers = [Kade(a.kade_bin, work)]
        if not a.skip_orthanc:
            servers.append(Orthanc(work))
        results = {}
        for s in servers:
            print(f"loading {len(files)} instances into {s.name} ...", flush=True)
            load(files, s.dicom, "STORESCU", "KADE" if s.name == "Kade" else "ORTHANC")
            r = {}
            r["QIDO PatientID=exact"] = latency(s, "/studies", {"PatientID": "PID000123"})
            r["QIDO PatientName=NAME12*"] = latency(s, "/studies", {"PatientName": "NAME12*"})
            r["QIDO StudyDate 1 month"] = latency(s, "/studies", {"StudyDate": "20240301-20240331"})
            r["QIDO ModalitiesInStudy=CT"] = latency(s, "/studies", {"ModalitiesInStudy": "CT"}, n=10)
            r["WADO metadata, 100-instance series"] = latency(
                s, f"/studies/{big_study}/series/{big_series}/metadata", {})
            r["STOW-RS instances/s (512x512, 4 clients)"] = stow(s, stow_files)
            r["WADO-RS study retrieve MB/s"] = retrieve(s, stow_study)[0]
            r["peak RSS MB"] = s.peak_rss_mb()
            results[s.name] = r
            s.stop()
        names = [s.name for s in servers]
        print()
        print(f"{a.studies} studies x {a.per_study} instances (+100); {a.stow} STOW instances")
        print("| metric | " + " | ".join(names) + (" | Kade / Orthanc |" if len(names) > 1 else " |"))
        print("|---|" + "---:|" * (len(names) + (1 if len(names) > 1 else 0)))
        for k in results["Kade"]:
            cells, vals = [], []
            for n in names:
                v = results[n][k]
                if isinstance(v, tuple):
                    cells.append(f"{v[0]:.1f} / {v[1]:.1f} ms ({v[2]} results)")
                    vals.append(v[0])
                else:
                    cells.append(f"{v:.1f}")
                    vals.append(v)
            ratio = f" | {vals[0] / vals[1]:.2f}" if len(vals) > 1 and vals[1] else ""
            print(f"| {k} | " + " | ".join(cells) + ratio + " |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
