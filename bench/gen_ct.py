#!/usr/bin/env python3
"""Generate a synthetic CT data set for Kade's ingest benchmark.

Writes N single-frame CT Image Storage instances (512x512, 16-bit signed, Explicit VR
Little Endian) spread over a number of studies and series, each with unique UIDs and
noisy pixel data (so that nothing downstream can shortcut on identical content).

A file `.complete` in the output directory records the parameters once every file is
written; a rerun with the same parameters does nothing.

Usage: gen_ct.py --out DIR [--instances 2000] [--studies 1] [--series 4] [--rows 512]
                 [--cols 512] [--seed 1]
"""

import argparse
import datetime
import json
import os
import sys

try:
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
except ImportError as exc:  # pragma: no cover - reported to the caller
    sys.exit(f"gen_ct.py: {exc} (pip install pydicom numpy)")

PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])
# A private-looking root keeps generated UIDs apart from real ones.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--instances", type=int, default=2000)
    p.add_argument("--studies", type=int, default=1)
    p.add_argument("--series", type=int, default=4, help="series in total, over all studies")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--patient-id", default=None,
                   help="Patient ID of every study (default BENCH0000, BENCH0001, ...)")
    p.add_argument("--bsn", default=None,
                   help="a national id (BSN) for the patient, as an Other Patient IDs item "
                        "with issuer NLMINBIZA")
    a = p.parse_args()
    if a.instances < 1 or a.studies < 1 or a.series < a.studies:
        p.error("need instances >= 1, studies >= 1 and series >= studies")
    return a


def write(ds, path):
    if PYDICOM_MAJOR >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        ds.save_as(path, write_like_original=False)


def make_base(rows, cols):
    """A round 'body' phantom in Hounsfield units, stored with intercept -1024."""
    y, x = np.ogrid[:rows, :cols]
    r2 = ((y - rows / 2) / (rows * 0.42)) ** 2 + ((x - cols / 2) / (cols * 0.36)) ** 2
    img = np.full((rows, cols), -1000, dtype=np.int32)  # air
    img[r2 < 1.0] = 40  # soft tissue
    img[(r2 > 0.85) & (r2 < 1.0)] = -100  # fat rim
    return img


def main():
    a = parse_args()
    params = {
        "instances": a.instances,
        "studies": a.studies,
        "series": a.series,
        "rows": a.rows,
        "cols": a.cols,
        "seed": a.seed,
        "transfer_syntax": str(ExplicitVRLittleEndian),
    }
    if a.patient_id:
        params["patient_id"] = a.patient_id
    if a.bsn:
        params["bsn"] = a.bsn
    os.makedirs(a.out, exist_ok=True)
    marker = os.path.join(a.out, ".complete")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == params:
                print(f"gen_ct.py: reusing {a.instances} instances in {a.out}")
                return
    # Start from an empty directory so that stale files of another size never mix in.
    for name in os.listdir(a.out):
        if name.endswith(".dcm") or name == ".complete":
            os.remove(os.path.join(a.out, name))

    rng = np.random.default_rng(a.seed)
    base = make_base(a.rows, a.cols)
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    # Series i belongs to study i % studies. Instances fill the series one after the other,
    # so that the sorted file list is in series order (as a modality sends it) and an even
    # split of it over K associations gives each one whole series when K divides the count.
    studies = [
        {"uid": generate_uid(UID_PREFIX), "patient": a.patient_id or f"BENCH{s:04d}",
         "acc": f"ACC{s:06d}"}
        for s in range(a.studies)
    ]
    series = [
        {"uid": generate_uid(UID_PREFIX), "study": studies[i % a.studies], "number": i + 1,
         "frame": generate_uid(UID_PREFIX), "count": 0}
        for i in range(a.series)
    ]

    for n in range(a.instances):
        se = series[n * a.series // a.instances]
        st = se["study"]
        se["count"] += 1
        idx = se["count"]
        sop_uid = generate_uid(UID_PREFIX)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID_PREFIX + "1"

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber = st["acc"]
        ds.Modality = "CT"
        ds.Manufacturer = "Kade bench"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Ingest benchmark"
        ds.SeriesDescription = f"Axial {se['number']}"
        ds.PatientName = f"Bench^{st['patient']}"
        ds.PatientID = st["patient"]
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        if a.bsn:
            other = Dataset()
            other.PatientID = a.bsn
            other.IssuerOfPatientID = "NLMINBIZA"
            ds.OtherPatientIDsSequence = [other]
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.StudyInstanceUID = st["uid"]
        ds.SeriesInstanceUID = se["uid"]
        ds.StudyID = "1"
        ds.SeriesNumber = se["number"]
        ds.InstanceNumber = idx
        ds.ImagePositionPatient = [-250.0, -250.0, float(idx)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.FrameOfReferenceUID = se["frame"]
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = float(idx)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = a.rows
        ds.Columns = a.cols
        ds.PixelSpacing = [0.9765625, 0.9765625]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"

        noise = rng.integers(-60, 61, size=(a.rows, a.cols), dtype=np.int32)
        pixels = np.clip(base + noise + 1024, -32768, 32767).astype("<i2")
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"

        write(ds, os.path.join(a.out, f"ct{n:06d}.dcm"))
        if (n + 1) % 500 == 0:
            print(f"gen_ct.py: {n + 1}/{a.instances}", file=sys.stderr)

    with open(marker, "w", encoding="utf-8") as f:
        json.dump(params, f)
    print(f"gen_ct.py: wrote {a.instances} instances ({a.studies} studies, "
          f"{a.series} series) to {a.out}")


if __name__ == "__main__":
    main()
