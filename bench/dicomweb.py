#!/usr/bin/env python3
"""DICOMweb benchmark: Kade against Orthanc + its DICOMweb plugin, same machine, same data.

Generates synthetic studies (a template data set encoded once by pydicom; per instance only
the UIDs and a few attributes are encoded, ~0.1 ms per small file), starts each server in turn
on an empty temporary directory, loads the same files into it over DIMSE (DCMTK storescu,
4 parallel associations), then measures:

  - QIDO-RS /studies latency, p50 / p95 of sequential warm requests, for PatientID (exact),
    PatientName (prefix wildcard, ~1 % of the studies), StudyDate (a range holding ~10 % of
    the studies) and ModalitiesInStudy=CT (a third of the studies: the large answer), without
    `limit`; both servers must return the same number of studies;
  - WADO-RS /studies/{st}/series/{se}/metadata latency for a 100- and a 600-instance series;
  - STOW-RS ingest, instances/s: 512x512 16-bit CT instances, one instance per request from 4
    concurrent clients (--stow, --stow-clients, --stow-batch);
  - WADO-RS retrieval of the STOW-RS study as one multipart/related response
    (transfer-syntax=*), MB/s, best of 3;
  - optionally (--large-study-gb) retrieval of a study of that size, loaded over DIMSE, with the
    server's peak RSS during the retrieval (VmHWM reset through /proc/PID/clear_refs first);
  - each server's peak RSS (VmHWM) over the whole run.

Kade is reached over HTTPS (its only listener; the client verifies its generated certificate)
with a bearer token. Orthanc over plain HTTP on 127.0.0.1 without authentication, which
favours Orthanc. Both clients send `Accept-Encoding: identity` (Orthanc would otherwise gzip
its JSON answers on loopback). Orthanc runs with LimitFindResults / LimitFindInstances 0
(unlimited) and otherwise default settings (SQLite index, files, DICOMweb plugin defaults:
SeriesMetadata "Full", i.e. /metadata reads every file).

Figures: MB = 10^6 bytes of the HTTP response bodies. Latency = time from sending a request to
the last byte of its answer on one kept-alive connection (Python http.client, garbage collector
paused; the JSON is parsed afterwards, outside the timing); p95 = nearest rank. STOW-RS and
retrieval use requests (HTTP/1.1). Before each measurement the script waits (--idle-wait) for
other processes to leave the CPUs alone; the report gives the CPU time other processes still
used during the timed requests, and whether a CI run (.ci/run) was seen.

Needs: DCMTK (apt-get install dcmtk), pydicom >= 2, numpy, requests; for Orthanc:
apt-get install orthanc orthanc-dicomweb (its system service is not used).
"""

import argparse
import concurrent.futures as cf
import datetime
import gc
import http.client
import json
import math
import os
import platform
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np
import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # private-looking root, apart from real UIDs
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
}
MODALITIES = ["CT", "MR", "CR"]
DATE_RANGE = "20240301-20240405"  # 36 of 366 days: ~10 % of the studies
NAME_QUERY = "PN12*"  # names PN000..PN999 by study index mod 1000: 1 %
HOST = "127.0.0.1"


T0 = time.time()
IDLE_WAIT = 120  # --idle-wait


def log(msg):
    print(f"dicomweb.py: [{time.time() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def dcmtk(tool):
    """DCMTK's own tool (pynetdicom installs Python programs with the same names)."""
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
        p = os.path.join(d, tool)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            out = subprocess.run([p, "--version"], capture_output=True, text=True).stdout
            if "$dcmtk:" in out:
                return p
    sys.exit(f"dicomweb.py: DCMTK {tool} not found (apt-get install dcmtk)")


def vm_hwm_mb(pid, field="VmHWM:"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return float("nan")


HZ = os.sysconf("SC_CLK_TCK")


def busy_cpu_s():
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / HZ


def process_cpu_s(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / HZ  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def own_cpu_s():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Interference:
    """CPU time used by processes other than this script, its children and the server."""

    def __init__(self, pid):
        self.pid = pid
        self.t0, self.busy0 = time.time(), busy_cpu_s()
        self.ours0 = own_cpu_s() + process_cpu_s(pid)

    def done(self):
        wall = time.time() - self.t0
        ours = own_cpu_s() + process_cpu_s(self.pid) - self.ours0
        other = max(0.0, busy_cpu_s() - self.busy0 - ours)
        return {"wall": wall, "other": other, "ours": ours}


MEASURED = {"wall": 0.0, "other": 0.0, "ours": 0.0}  # summed over the timed parts only


class measured:
    """Context manager: adds the interference during a timed part to MEASURED."""

    def __init__(self, pid):
        self.pid = pid

    def __enter__(self):
        self.probe = Interference(self.pid)

    def __exit__(self, *exc):
        for k, v in self.probe.done().items():
            MEASURED[k] += v


def wait_idle(pid, max_wait, what):
    """Waits up to `max_wait` s until other processes use < 0.15 core for 3 s in a row."""
    if max_wait <= 0:
        return
    t_end = time.time() + max_wait
    waited = False
    while True:
        probe = Interference(pid)
        time.sleep(3)
        used = probe.done()
        load = used["other"] / used["wall"]
        if load < 0.15:
            if waited:
                log(f"machine quiet again ({load:.2f} cores used by others); measuring {what}")
            return
        if time.time() >= t_end:
            log(f"other processes still use {load:.2f} cores after {max_wait} s; "
                f"measuring {what} anyway")
            return
        if not waited:
            log(f"other processes use {load:.2f} cores; waiting up to {max_wait} s before "
                f"measuring {what}")
        waited = True


def reset_hwm(pid):
    """Resets the peak RSS of a process to its current RSS (Linux >= 4.0, own processes)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Data


class Generator:
    """Writes instances from one template data set, changing only UIDs and a few attributes."""

    def __init__(self, out, run):
        self.out = out
        self.run = run
        self.uid_n = 0
        self.small = self._compile(self._template(64))
        self.large = self._compile(self._template(512))

    def uid(self):
        self.uid_n += 1
        return f"{UID_ROOT}{self.run}.{self.uid_n}"

    @staticmethod
    def _template(size):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = UID_ROOT + "1"
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = SOP_CLASS["CT"]
        ds.SOPInstanceUID = UID_ROOT + "0"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "Kade bench"
        ds.InstitutionName = "Bench Hospital"
        ds.ReferringPhysicianName = "REF^DOCTOR"
        ds.StudyDescription = "DICOMweb benchmark"
        ds.SeriesDescription = "Axial"
        ds.PatientName = "PN000^GIVEN"
        ds.PatientID = "PID"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.StudyInstanceUID = UID_ROOT + "0"
        ds.SeriesInstanceUID = UID_ROOT + "0"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.ImagePositionPatient = [-250.0, -250.0, 1.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.FrameOfReferenceUID = UID_ROOT + "0"
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = 1.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [0.9765625, 0.9765625]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        rng = np.random.default_rng(size)
        ds.PixelData = rng.integers(0, 2048, size=(size, size), dtype=np.int16).astype("<i2").tobytes()
        ds["PixelData"].VR = "OW"
        return ds

    # Attributes that change per instance, encoded by hand; everything else is encoded once by
    # pydicom (about 50x faster than pydicom writing every file).
    VARIABLE = {
        "SOPClassUID": "UI", "SOPInstanceUID": "UI", "StudyDate": "DA", "SeriesDate": "DA",
        "ContentDate": "DA", "AccessionNumber": "SH", "Modality": "CS", "PatientName": "PN",
        "PatientID": "LO", "StudyInstanceUID": "UI", "SeriesInstanceUID": "UI",
        "SeriesNumber": "IS", "InstanceNumber": "IS", "ImagePositionPatient": "DS",
        "FrameOfReferenceUID": "UI", "SliceLocation": "DS",
    }

    @staticmethod
    def _element(tag, vr, value):
        b = value.encode("ascii")
        if len(b) % 2:
            b += b"\0" if vr == "UI" else b" "
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(b)) + b

    def _compile(self, ds):
        """Splits a template into pre-encoded static chunks and (tag, VR, keyword) slots."""
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_data_element

        parts = []
        for elem in ds:
            if elem.keyword in self.VARIABLE:
                parts.append((elem.tag, self.VARIABLE[elem.keyword], elem.keyword))
                continue
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_data_element(fp, elem)
            parts.append(fp.getvalue())
        return parts

    def encode(self, parts, values):
        meta = b"".join([
            struct.pack("<HH2sHI", 2, 1, b"OB", 0, 2) + b"\x00\x01",  # version
            self._element(0x00020002, "UI", values["SOPClassUID"]),
            self._element(0x00020003, "UI", values["SOPInstanceUID"]),
            self._element(0x00020010, "UI", ExplicitVRLittleEndian),
            self._element(0x00020012, "UI", UID_ROOT + "1"),
        ])
        out = [b"\0" * 128, b"DICM", struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta)), meta]
        for p in parts:
            out.append(p if isinstance(p, bytes) else self._element(p[0], p[1], values[p[2]]))
        return b"".join(out)

    def write(self, parts, values, name):
        path = os.path.join(self.out, name)
        with open(path, "wb") as f:
            f.write(self.encode(parts, values))
        return path

    def series(self, prefix, study, count, size=64, modality="CT", patient=("PID", "PN^X"),
               date="20240101", series_number=1):
        parts = self.small if size == 64 else self.large
        series = self.uid()
        v = {
            "StudyInstanceUID": study, "SeriesInstanceUID": series,
            "FrameOfReferenceUID": series + ".1", "PatientID": patient[0],
            "PatientName": patient[1], "AccessionNumber": "A" + patient[0][-12:],
            "StudyDate": date, "SeriesDate": date, "ContentDate": date, "Modality": modality,
            "SOPClassUID": SOP_CLASS[modality], "SeriesNumber": str(series_number),
        }
        files = []
        for n in range(count):
            v["SOPInstanceUID"] = self.uid()
            v["InstanceNumber"] = str(n + 1)
            v["ImagePositionPatient"] = f"-250\\-250\\{n}"
            v["SliceLocation"] = str(n)
            files.append(self.write(parts, v, f"{prefix}_{n:05d}.dcm"))
        return series, files


def study_date(i):
    day = (i * 7919) % 366  # scattered over 2024 (a leap year), independent of the index order
    return (datetime.date(2024, 1, 1) + datetime.timedelta(days=day)).strftime("%Y%m%d")


def generate(work, studies, per_study, stow_count, large_gb, run):
    g_dir = os.path.join(work, "data")
    os.makedirs(g_dir)
    gen = Generator(g_dir, run)
    data = {"search": [], "metadata": {}, "large": None}
    t0 = time.time()
    for i in range(studies):
        mod = MODALITIES[i % 3]
        patient = (f"PID{i:06d}", f"PN{i % 1000:03d}^GIVEN{i // 1000}")
        _, files = gen.series(f"s{i:06d}", gen.uid(), per_study, 64, mod, patient, study_date(i))
        data["search"] += files
    for count in (100, 600):
        st = gen.uid()
        se, files = gen.series(f"meta{count}", st, count, 64, "CT",
                               (f"PIDMETA{count}", "META^SERIES"), "20230101")
        data["metadata"][count] = (st, se)
        data["search"] += files
    if large_gb > 0:
        per = 512 * 512 * 2 + 1500
        count = int(math.ceil(large_gb * 1e9 / per))
        st = gen.uid()
        files = []
        for s in range(0, count, 500):
            _, f = gen.series(f"large{s:06d}", st, min(500, count - s), 512, "CT",
                              ("PIDLARGE", "LARGE^STUDY"), "20220101", s // 500 + 1)
            files += f
        data["large"] = (st, files)
    stow_study = gen.uid()
    stow_dir = os.path.join(work, "stow")
    os.makedirs(stow_dir)
    gen.out = stow_dir
    _, data["stow"] = gen.series("stow", stow_study, stow_count, 512, "CT",
                                 ("PIDSTOW", "STOW^BENCH"), "20220102")
    data["stow_study"] = stow_study
    n = len(data["search"]) + len(data["stow"]) + (len(data["large"][1]) if data["large"] else 0)
    log(f"generated {n} instances in {time.time() - t0:.1f} s")
    return data


def load(files, port, called, associations=4):
    """Sends the files over DIMSE with `associations` concurrent storescu processes."""
    storescu = dcmtk("storescu")
    procs = []
    t0 = time.time()
    for k in range(associations):
        part = files[k::associations]
        if not part:
            continue
        procs.append(subprocess.Popen(
            [storescu, "-aet", "STORESCU", "-aec", called, "-nh", "-to", "30", "-ta", "30",
             "-td", "600", HOST, str(port)] + part,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "TCP_NODELAY": "1"}))
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0 or b"E: " in err:
            sys.exit(f"dicomweb.py: storescu failed (rc {p.returncode}): {err.decode()[-800:]}")
    return len(files) / (time.time() - t0)


# ---------------------------------------------------------------------------------------------
# Servers


class Server:
    name = ""
    proc = None
    session = None
    base = ""
    called = ""
    dicom = 0

    def hwm(self):
        return vm_hwm_mb(self.proc.pid)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    auth = {}
    path_prefix = "/dicom-web"
    http_port = 0

    def connection(self):
        return http.client.HTTPConnection(HOST, self.http_port, timeout=600)

    def _session(self):
        s = requests.Session()
        s.trust_env = False
        s.headers["Accept-Encoding"] = "identity"
        return s


class Kade(Server):
    name = "Kade"
    called = "KADE"

    def __init__(self, binary, work):
        self.dir = os.path.join(work, "kade")
        data = os.path.join(self.dir, "data")
        os.makedirs(self.dir)
        self.dicom, self.http_port = free_port(), free_port()
        subprocess.run([binary, "--data-dir", data, "peer", "add", "STORESCU", "--host", HOST,
                        "--allow", "echo,store"], check=True, capture_output=True)
        self.out = os.path.join(self.dir, "kade.out")
        self.err = os.path.join(self.dir, "kade.err")
        env = {**os.environ, "KADE_HTTP_BIND": HOST}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [binary, "--data-dir", data, "serve", "--bind", HOST, "--port", str(self.dicom),
                 "--http-port", str(self.http_port)], stdout=out, stderr=err, env=env)
        token = None
        for _ in range(600):
            text = open(self.out).read()
            for line in text.splitlines():
                if line.startswith("kade: admin token "):
                    token = line.split()[-1]
            if token and "DICOM listening" in text and "HTTPS listening" in text:
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        else:
            token = None
        if not token:
            self.stop()
            sys.exit(f"dicomweb.py: kade did not start; see {self.err}:\n"
                     + open(self.err).read()[-2000:])
        self.base = f"https://{HOST}:{self.http_port}/dicom-web"
        self.session = self._session()
        self.session.verify = os.path.join(data, "tls", "cert.pem")
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.auth = {"Authorization": f"Bearer {token}"}
        self.ssl = ssl.create_default_context(cafile=self.session.verify)
        self.version = subprocess.run([binary, "--version"], capture_output=True,
                                      text=True).stdout.strip()


    def connection(self):
        return http.client.HTTPSConnection(HOST, self.http_port, timeout=600, context=self.ssl)


class Orthanc(Server):
    name = "Orthanc"
    called = "ORTHANC"

    def __init__(self, binary, work, extra_config=None):
        self.dir = os.path.join(work, "orthanc")
        os.makedirs(self.dir)
        self.dicom, self.http_port = free_port(), free_port()
        plugin = None
        out = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True)
        for cand in ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"] + out.stdout.split():
            if cand.endswith((".so", ".so.1.7")) and "DicomWeb" in cand and os.path.exists(cand):
                plugin = cand
                break
        if plugin is None:
            sys.exit("dicomweb.py: Orthanc's DICOMweb plugin not found "
                     "(apt-get install orthanc-dicomweb)")
        cfg = {
            "Name": "KadeBench",
            "StorageDirectory": os.path.join(self.dir, "storage"),
            "IndexDirectory": os.path.join(self.dir, "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        cfg.update(extra_config or {})
        self.config = os.path.join(self.dir, "orthanc.json")
        with open(self.config, "w") as f:
            json.dump(cfg, f, indent=2)
        self.log = os.path.join(self.dir, "orthanc.log")
        with open(self.log, "w") as lf:
            # DCMTK (inside Orthanc) disables Nagle's algorithm only when TCP_NODELAY is set.
            self.proc = subprocess.Popen([binary, self.config], stdout=lf, stderr=lf,
                                         env={**os.environ, "TCP_NODELAY": "1"})
        self.session = self._session()
        self.base = f"http://{HOST}:{self.http_port}/dicom-web"
        for _ in range(600):
            try:
                r = self.session.get(f"http://{HOST}:{self.http_port}/system")
                if r.ok:
                    self.version = f"Orthanc {r.json().get('Version')}"
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        else:
            self.version = None
        if self.proc.poll() is not None or not getattr(self, "version", None):
            self.stop()
            sys.exit(f"dicomweb.py: Orthanc did not start; see {self.log}:\n"
                     + open(self.log).read()[-2000:])
        r = self.session.get(f"http://{HOST}:{self.http_port}/plugins/dicom-web")
        if r.ok:
            self.version += f", DICOMweb plugin {r.json().get('Version')}"
        else:
            sys.exit("dicomweb.py: Orthanc started without its DICOMweb plugin")


# ---------------------------------------------------------------------------------------------
# Measurements


def pct(sorted_ms, p):
    return sorted_ms[max(0, math.ceil(p / 100 * len(sorted_ms)) - 1)]


def latency(server, path, params, n, warmup):
    """p50 / p95 of `n` sequential GETs on one kept-alive connection, after `warmup` ones.

    Timed with http.client (the time to the last byte of the body, JSON parsed afterwards) and
    the garbage collector paused: requests adds 1-10 ms of its own per answer over TLS, which
    would hide the servers' differences.
    """
    # `*` stays as it is: Orthanc 1.10 does not percent-decode %2A in query arguments, so
    # `PatientName=PN12%2A` (what requests would send) matches nothing there.
    url = server.path_prefix + path
    if params:
        url += "?" + "&".join(f"{k}={urllib.parse.quote(v, safe='*')}" for k, v in params.items())
    headers = {**server.auth, "Accept": "application/dicom+json", "Accept-Encoding": "identity"}
    wait_idle(server.proc.pid, IDLE_WAIT, url)
    conn = server.connection()
    times, body = [], b""
    gc.collect()
    gc.disable()
    try:
        with measured(server.proc.pid):
            for i in range(n + warmup):
                t0 = time.perf_counter()
                conn.request("GET", url, headers=headers)
                r = conn.getresponse()
                body = r.read()
                dt = (time.perf_counter() - t0) * 1000
                if r.status not in (200, 204):
                    sys.exit(f"dicomweb.py: {server.name} GET {url}: {r.status} {body[:300]!r}")
                if i >= warmup:
                    times.append(dt)
    finally:
        gc.enable()
        conn.close()
    times.sort()
    return {"p50": pct(times, 50), "p95": pct(times, 95),
            "count": len(json.loads(body)) if body else 0, "bytes": len(body)}


def stow(server, files, clients, batch):
    bodies = []
    for k in range(0, len(files), batch):
        parts = []
        for f in files[k:k + batch]:
            with open(f, "rb") as fh:
                parts.append(b"--BENCHBOUNDARY\r\nContent-Type: application/dicom\r\n\r\n"
                             + fh.read() + b"\r\n")
        bodies.append(b"".join(parts) + b"--BENCHBOUNDARY--\r\n")
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; '
                               'boundary=BENCHBOUNDARY',
               "Accept": "application/dicom+json"}

    def one(body):
        r = server.session.post(server.base + "/studies", data=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"{server.name} STOW-RS: {r.status_code} {r.text[:300]}")
        if r.json().get("00081198", {}).get("Value"):
            raise RuntimeError(f"{server.name} STOW-RS: failed SOP instances {r.text[:300]}")

    with measured(server.proc.pid):
        cpu0, t0 = process_cpu_s(server.proc.pid), time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as ex:
            list(ex.map(one, bodies))
        dt = time.perf_counter() - t0
        cpu = process_cpu_s(server.proc.pid) - cpu0
    return len(files) / dt, cpu * 1000 / len(files)


def retrieve(server, study, expect_bytes, repeat=3):
    """Best of `repeat` retrievals of a whole study: MB/s, bytes, and the server's CPU seconds
    per GB in that retrieval; checks the size of the answer."""
    best, size, cpu_per_gb = 0.0, 0, 0.0
    for _ in range(repeat):
        with measured(server.proc.pid):
            cpu0, t0 = process_cpu_s(server.proc.pid), time.perf_counter()
            r = server.session.get(server.base + f"/studies/{study}", stream=True, headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
            if r.status_code != 200:
                sys.exit(f"dicomweb.py: {server.name} retrieve: {r.status_code} {r.text[:300]}")
            size = 0
            for chunk in r.iter_content(1 << 20):
                size += len(chunk)
            dt = time.perf_counter() - t0
            cpu = process_cpu_s(server.proc.pid) - cpu0
        if size < expect_bytes:
            sys.exit(f"dicomweb.py: {server.name} retrieve: {size} bytes, expected at least "
                     f"{expect_bytes}")
        if size / 1e6 / dt > best:
            best, cpu_per_gb = size / 1e6 / dt, cpu / (size / 1e9)
    return best, size, cpu_per_gb


def count_instances(server, study, series=None):
    path = f"/studies/{study}" + (f"/series/{series}" if series else "") + "/instances"
    r = server.session.get(server.base + path, headers={"Accept": "application/dicom+json"})
    return len(r.json()) if r.status_code == 200 else 0


def bench_server(server, data, a, work):
    res = {}
    n = len(data["search"])
    log(f"{server.name}: loading {n} instances over DIMSE (4 associations)")
    res["load"] = load(data["search"], server.dicom, server.called)
    log(f"{server.name}: {res['load']:.0f} instances/s")
    if data["large"]:
        st, files = data["large"]
        log(f"{server.name}: loading the large study ({len(files)} instances)")
        res["large_load"] = load(files, server.dicom, server.called)
    # Let the page cache write back what the loads left dirty before measuring.
    os.sync()
    time.sleep(2)
    for count, (st, se) in data["metadata"].items():
        got = count_instances(server, st, se)
        if got != count:
            sys.exit(f"dicomweb.py: {server.name} holds {got} instances of the {count}-instance "
                     "series")
    reps, warm = a.requests, a.warmup
    for k in MEASURED:
        MEASURED[k] = 0.0
    q = {}
    log(f"{server.name}: QIDO-RS")
    q["pid"] = latency(server, "/studies", {"PatientID": f"PID{a.studies // 2:06d}"}, reps, warm)
    q["name"] = latency(server, "/studies", {"PatientName": NAME_QUERY}, reps, warm)
    q["date"] = latency(server, "/studies", {"StudyDate": DATE_RANGE}, reps, warm)
    q["ct"] = latency(server, "/studies", {"ModalitiesInStudy": "CT"}, reps, warm)
    log(f"{server.name}: WADO-RS metadata")
    for count, (st, se) in data["metadata"].items():
        q[f"meta{count}"] = latency(server, f"/studies/{st}/series/{se}/metadata", {}, reps, warm)
        if q[f"meta{count}"]["count"] != count:
            sys.exit(f"dicomweb.py: {server.name} /metadata returned {q[f'meta{count}']['count']}"
                     f" of {count} instances")
    res["q"] = q
    log(f"{server.name}: STOW-RS ({len(data['stow'])} instances)")
    wait_idle(server.proc.pid, IDLE_WAIT, "STOW-RS")
    res["stow"], res["stow_cpu"] = stow(server, data["stow"], a.stow_clients, a.stow_batch)
    got = count_instances(server, data["stow_study"])
    if got != len(data["stow"]):
        sys.exit(f"dicomweb.py: {server.name} holds {got} of {len(data['stow'])} STOW instances")
    stow_bytes = sum(os.path.getsize(f) for f in data["stow"])
    log(f"{server.name}: WADO-RS retrieve of the STOW-RS study")
    wait_idle(server.proc.pid, IDLE_WAIT, "retrieval")
    res["retrieve"], res["retrieve_bytes"], res["retrieve_cpu"] = retrieve(server, data["stow_study"], stow_bytes)
    if data["large"]:
        st, files = data["large"]
        expect = sum(os.path.getsize(f) for f in files)
        wait_idle(server.proc.pid, IDLE_WAIT, "the large retrieval")
        res["hwm_before_large"] = server.hwm()
        res["rss_before_large"] = vm_hwm_mb(server.proc.pid, "VmRSS:")
        res["hwm_reset"] = reset_hwm(server.proc.pid)
        log(f"{server.name}: WADO-RS retrieve of the large study ({expect / 1e9:.2f} GB)")
        res["large"], res["large_bytes"], res["large_cpu"] = retrieve(server, st, expect, repeat=1)
        res["large_hwm"] = server.hwm()
    res["interference"] = dict(MEASURED)
    res["hwm"] = server.hwm() if not data["large"] else max(res["hwm_before_large"],
                                                             res["large_hwm"])
    return res


# ---------------------------------------------------------------------------------------------
# Report


def table(results, a, data, versions, ci_running):
    names = list(results)
    both = len(names) == 2
    lines = []
    head = "| metric | " + " | ".join(names) + (" | Kade / Orthanc | target |" if both else " |")
    lines += [head, "| --- |" + " ---: |" * (len(names) + (1 if both else 0))
              + (" --- |" if both else "")]

    def row(label, cells, ratio="", target=""):
        lines.append(f"| {label} | " + " | ".join(cells)
                     + (f" | {ratio} | {target} |" if both else " |"))

    def cpu_row(label, key):
        vals = [results[n][key] for n in names]
        row(label, [f"{v:.2f}" for v in vals],
            f"{vals[0] / vals[1]:.2f}" if both and vals[1] else "", "")

    qlabels = [
        ("pid", f"QIDO `PatientID=` exact, p50 / p95 ms", 0.2),
        ("name", f"QIDO `PatientName={NAME_QUERY}`, p50 / p95 ms", 0.2),
        ("date", f"QIDO `StudyDate={DATE_RANGE}`, p50 / p95 ms", 0.2),
        ("ct", "QIDO `ModalitiesInStudy=CT`, p50 / p95 ms", 0.2),
        ("meta100", "WADO-RS `/metadata` 100 instances, p50 / p95 ms", None),
        ("meta600", "WADO-RS `/metadata` 600 instances, p50 / p95 ms", None),
    ]
    for key, label, tgt in qlabels:
        cells, p50s = [], []
        for n in names:
            v = results[n]["q"][key]
            cells.append(f"{v['p50']:.1f} / {v['p95']:.1f}")
            p50s.append(v["p50"])
        counts = {results[n]["q"][key]["count"] for n in names}
        label2 = label.replace(", p50", f" ({'/'.join(str(c) for c in sorted(counts))} "
                                         f"{'instances' if key.startswith('meta') else 'studies'})"
                                         ", p50")
        if len(counts) > 1:
            label2 += " **(answers differ)**"
        ratio = target = ""
        if both:
            k, o = results["Kade"]["q"][key], results["Orthanc"]["q"][key]
            ratio = f"{k['p50'] / o['p50']:.2f} / {k['p95'] / o['p95']:.2f}"
            if tgt:
                ok = k["p50"] <= tgt * o["p50"] and k["p95"] <= tgt * o["p95"]
                target = f"≤ {tgt:g}: {'met' if ok else 'missed'}"
            else:
                lim = 10 if key == "meta100" else 50
                target = f"p95 < {lim} ms: {'met' if k['p95'] < lim else 'missed'}"
        elif key.startswith("meta"):
            pass
        row(label2, cells, ratio, target)
    for key, label, tgt in [
        ("load", "DIMSE load (64x64, 4 associations), instances/s", None),
        ("stow", f"STOW-RS {len(data['stow'])} x 512x512, {a.stow_clients} clients x "
                 f"{a.stow_batch} instance(s)/request, instances/s", 3),
        ("retrieve", f"WADO-RS retrieve {results[names[0]]['retrieve_bytes'] / 1e6:.0f} MB "
                     "study, MB/s (best of 3)", 2),
    ]:
        vals = [results[n][key] for n in names]
        ratio = target = ""
        if both:
            ratio = f"{vals[0] / vals[1]:.2f}"
            if tgt:
                target = f"≥ {tgt}: {'met' if vals[0] >= tgt * vals[1] else 'missed'}"
        row(label, [f"{v:.1f}" for v in vals], ratio, target)
        if key == "stow":
            cpu_row("server CPU per STOW-RS instance, ms", "stow_cpu")
        if key == "retrieve":
            cpu_row("server CPU per GB retrieved (that retrieval), s", "retrieve_cpu")
    if data["large"]:
        vals = [results[n]["large"] for n in names]
        ratio = f"{vals[0] / vals[1]:.2f}" if both else ""
        target = (f"≥ 2: {'met' if vals[0] >= 2 * vals[1] else 'missed'}") if both else ""
        row(f"WADO-RS retrieve {results[names[0]]['large_bytes'] / 1e9:.2f} GB study, MB/s",
            [f"{v:.1f}" for v in vals], ratio, target)
        cpu_row("server CPU per GB retrieved (that retrieval), s", "large_cpu")
        vals = [results[n]["large_hwm"] for n in names]
        row("RSS before → peak RSS during that retrieval, MB"
            + ("" if all(results[n]["hwm_reset"] for n in names) else " (peak not reset)"),
            [f"{results[n]['rss_before_large']:.1f} → {results[n]['large_hwm']:.1f}"
             for n in names], f"{vals[0] / vals[1]:.2f}" if both else "", "")
    vals = [results[n]["hwm"] for n in names]
    row("peak RSS over the run, MB", [f"{v:.1f}" for v in vals],
        f"{vals[0] / vals[1]:.2f}" if both else "", "")

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    print()
    print(f"## DICOMweb benchmark ({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})")
    print()
    print("\n".join(lines))
    print()
    print(f"- Data: {a.studies} studies x {a.per_study} instances (64x64 CT/MR/CR in turn), "
          f"+ a 100- and a 600-instance series, loaded over DIMSE; {len(data['stow'])} "
          f"512x512x16-bit instances sent with STOW-RS"
          + (f"; a {len(data['large'][1])}-instance study loaded over DIMSE" if data["large"]
             else ""))
    print(f"- QIDO / metadata: {a.requests} sequential requests after {a.warmup} warm-up ones; "
          "one kept-alive connection, time to the last byte of the answer (Python http.client), "
          "p95 = nearest rank")
    print(f"- Machine: {os.cpu_count()} CPU(s), {cpu}, {platform.system()} {platform.release()}")
    for n, v in versions.items():
        print(f"- {n}: {v}")
    print("- Kade over HTTPS with a bearer token (TLS 1.3, certificate verified); Orthanc over "
          "plain HTTP without authentication; both with Accept-Encoding: identity")
    sizes = ", ".join(f"{n} {results[n]['q']['ct']['bytes'] / 1e3:.0f} kB" for n in names)
    print(f"- Size of the `ModalitiesInStudy=CT` answer (default attributes): {sizes}")
    for n in names:
        i = results[n]["interference"]
        print(f"- CPU used by other processes during {n}'s timed requests: {i['other']:.1f} s in "
              f"{i['wall']:.0f} s ({i['other'] / max(i['wall'], 1e-9):.2f} of {os.cpu_count()} "
              f"cores on average; this client and the server used {i['ours']:.0f} s)")
    if ci_running:
        print("- NOTE: a CI run (.ci/run) was active during part of this benchmark")


def ci_active():
    try:
        out = subprocess.run(["pgrep", "-f", ".ci/run"], capture_output=True, text=True).stdout
    except OSError:
        return False
    return bool(out.strip())


class CiWatch(threading.Thread):
    """Notes whether a CI run of this repository (.ci/run) is active at any time (5 s polls)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen = ci_active()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(5):
            self.seen = self.seen or ci_active()


def default_kade():
    dirs = [os.environ.get("CARGO_TARGET_DIR"),
            os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target"),
            os.path.expanduser("~/.cache/kade-target")]
    for d in dirs:
        if d and os.access(os.path.join(d, "release", "kade"), os.X_OK):
            return os.path.join(d, "release", "kade")
    return None


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] + """
Examples:
  cargo build --release --bin kade
  python3 bench/dicomweb.py --studies 2000
  python3 bench/dicomweb.py --studies 2000 --large-study-gb 2
  python3 bench/dicomweb.py --studies 200 --requests 10 --stow 50 --skip-orthanc
""")
    ap.add_argument("--studies", type=int, default=2000,
                    help="small studies to index (default 2000)")
    ap.add_argument("--per-study", type=int, default=2,
                    help="instances per small study (default 2)")
    ap.add_argument("--requests", type=int, default=50,
                    help="measured requests per QIDO / metadata query (default 50)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up requests (default 5)")
    ap.add_argument("--stow", type=int, default=500,
                    help="512x512 instances sent with STOW-RS, then retrieved (default 500)")
    ap.add_argument("--stow-clients", type=int, default=4,
                    help="concurrent STOW-RS requests (default 4)")
    ap.add_argument("--stow-batch", type=int, default=1,
                    help="instances per STOW-RS request (default 1)")
    ap.add_argument("--large-study-gb", type=float, default=0,
                    help="also retrieve a study of this size (GB, loaded over DIMSE) and "
                         "report the peak RSS during the retrieval (default 0: skipped)")
    ap.add_argument("--idle-wait", type=float, default=120,
                    help="before each measurement wait up to this many seconds for other "
                         "processes to use < 0.15 core (default 120; 0: don't wait)")
    ap.add_argument("--kade-bin", default=default_kade(),
                    help="kade binary (default: release build in $CARGO_TARGET_DIR, "
                         "./target or ~/.cache/kade-target)")
    ap.add_argument("--orthanc-bin", default=shutil.which("Orthanc") or "Orthanc")
    ap.add_argument("--skip-orthanc", action="store_true", help="measure Kade only")
    ap.add_argument("--skip-kade", action="store_true", help="measure Orthanc only")
    ap.add_argument("--work", default=None, help="parent of the temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    global IDLE_WAIT
    IDLE_WAIT = a.idle_wait
    if a.studies < 1 or a.per_study < 1 or a.requests < 1 or a.stow < 1:
        ap.error("--studies, --per-study, --requests and --stow must be positive")
    if not a.skip_kade and not (a.kade_bin and os.access(a.kade_bin, os.X_OK)):
        ap.error("no kade binary: cargo build --release --bin kade, or --kade-bin PATH")
    if not a.skip_orthanc and not shutil.which(a.orthanc_bin):
        ap.error("Orthanc not found: apt-get install orthanc orthanc-dicomweb")
    dcmtk("storescu")

    work = tempfile.mkdtemp(prefix="kade-dicomweb-", dir=a.work)
    ci = CiWatch()
    ci.start()
    servers = []
    try:
        log(f"work directory {work}")
        data = generate(work, a.studies, a.per_study, a.stow, a.large_study_gb,
                        int(time.time() * 1000))
        plan = []
        if not a.skip_kade:
            plan.append(lambda: Kade(a.kade_bin, work))
        if not a.skip_orthanc:
            plan.append(lambda: Orthanc(a.orthanc_bin, work))
        results, versions = {}, {}
        for start in plan:
            subprocess.run(["sync"])
            server = start()
            servers.append(server)
            log(f"{server.name} ({server.version}) pid {server.proc.pid}")
            versions[server.name] = server.version
            results[server.name] = bench_server(server, data, a, work)
            server.stop()
            if not a.keep:
                shutil.rmtree(server.dir, ignore_errors=True)
        if len(results) == 2:
            for key in results["Kade"]["q"]:
                ck, co = results["Kade"]["q"][key]["count"], results["Orthanc"]["q"][key]["count"]
                if ck != co:
                    log(f"WARNING: {key}: Kade returned {ck} results, Orthanc {co}")
        table(results, a, data, versions, ci.seen)
    finally:
        for s in servers:
            s.stop()
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
