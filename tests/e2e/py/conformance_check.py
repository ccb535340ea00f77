#!/usr/bin/env python3
"""Test data and standard-client checks for Kade's conformance tests (tests/e2e/conformance.rs).

Two commands:

  conformance_check.py fixtures --out DIR --rle FILE
      Writes the test instances into DIR and DIR/manifest.json: the UIDs by name (the Rust
      tables refer to names such as "S1", "S1a", "I1a1") and the files of each group:
        corpus  five studies of four patients for the matching tables (PS3.4 C.2.2.2),
        zoo     one instance holding every VR of PS3.5, multi-valued, empty, nested, and
                Decimal Strings in forms that are not JSON numbers (PS3.18 F.2),
        wado    one study stored as Implicit VR LE, Explicit VR LE and RLE Lossless (FILE is
                an RLE Lossless image whose UIDs are replaced) for WADO-RS (PS3.18 8.7.3).

  conformance_check.py clients --url URL --token T --ca CERT --manifest DIR/manifest.json
      Reads every search and metadata response through dicomweb-client and parses each data
      set with pydicom's Dataset.from_json with warnings turned into errors. Checks the
      ordering and naming of attribute keys (PS3.18 F.2.2) and that the zoo instance's metadata
      holds the same values as the stored file. Reports every failure, exits 1 if any.
"""

import argparse
import base64
import json
import os
import struct
import sys
import warnings

ROOT = "1.2.826.0.1.3680043.8.498.15150"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"

# ---------------------------------------------------------------------------------------------
# The matching corpus: patients, studies, series, instances (names as in the Rust tables).
# ---------------------------------------------------------------------------------------------

PATIENTS = {
    "P1": ("CONF-P1", "Müller^Jürgen"),
    "P2": ("CONF-P2", "Möller^Jan"),
    "P3": ("CONF-P3", "MULLER^HANS"),
    "P4": ("conf-p1", "Maier^Anna"),  # the ID of P1 in lower case: PatientID is case-sensitive
}

# name: (patient, StudyDate, StudyTime, StudyDescription, AccessionNumber,
#        [(series name, Modality, SeriesNumber, SeriesDescription, instance count)])
STUDIES = {
    "S1": ("P1", "20200115", "101500", "Brain MR routine", "ACC-001",
           [("S1a", "MR", 1, "T1 axial", 2), ("S1b", "CT", 2, "Scout", 1)]),
    "S2": ("P1", "20201231", "080000", "brain mr follow-up", "acc-001",
           [("S2a", "MR", 1, "T2 axial", 1)]),
    "S3": ("P2", "20210101", "143000", "Chest CT", "ACC-003",
           [("S3a", "CT", 1, "Lung", 2)]),
    "S4": ("P3", "20191231", "235959", "BRAIN MR", "ACC-004",
           [("S4a", "MR", 1, "t1 AXIAL", 1)]),
    "S5": ("P4", "20200601", "000000", "Knie Übersicht MRI", "ACC-005",
           [("S5a", "MR", 1, "PD sag", 1)]),
}


def corpus_uids():
    uids = {}
    for si, (name, (_, _, _, _, _, series)) in enumerate(STUDIES.items(), start=1):
        uids[name] = f"{ROOT}.1.{si}"
        for ki, (se, _, _, _, count) in enumerate(series, start=1):
            uids[se] = f"{ROOT}.2.{si}.{ki}"
            for i in range(1, count + 1):
                uids[f"I{se[1:]}{i}"] = f"{ROOT}.3.{si}.{ki}.{i}"
    return uids


def write_corpus(out, uids):
    from pydicom.dataset import Dataset, FileMetaDataset

    files = []
    for name, (patient, date, time, desc, acc, series) in STUDIES.items():
        pid, pname = PATIENTS[patient]
        for se, modality, number, sdesc, count in series:
            for i in range(1, count + 1):
                ds = Dataset()
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.SOPClassUID = MR if modality == "MR" else CT
                ds.SOPInstanceUID = uids[f"I{se[1:]}{i}"]
                ds.StudyInstanceUID = uids[name]
                ds.SeriesInstanceUID = uids[se]
                ds.PatientName = pname
                ds.PatientID = pid
                ds.PatientBirthDate = "19700101"
                ds.PatientSex = "O"
                ds.StudyDate = date
                ds.StudyTime = time
                ds.StudyDescription = desc
                ds.AccessionNumber = acc
                ds.StudyID = name
                ds.ReferringPhysicianName = "Ref^Doc"
                ds.Modality = modality
                ds.SeriesNumber = number
                ds.SeriesDescription = sdesc
                ds.InstanceNumber = i
                ds.Rows = ds.Columns = 4
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.BitsAllocated = ds.BitsStored = 8
                ds.HighBit = 7
                ds.PixelRepresentation = 0
                ds.PixelData = bytes(range(i, i + 16))
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = EXPLICIT
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                path = os.path.join(out, f"corpus_{se}_{i}.dcm")
                ds.save_as(path, enforce_file_format=True)
                files.append(path)
    return files


# ---------------------------------------------------------------------------------------------
# The VR zoo, encoded by hand (Explicit VR Little Endian) so that every value is stored with
# exactly the bytes written here: pydicom would normalise " 1.5" to "1.5" and drop (0008,0000).
# ---------------------------------------------------------------------------------------------

LONG_LENGTH = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
            "UI", "UR", "UT"}


def element(tag, vr, value):
    """One Explicit VR Little Endian data element; `value` is bytes, str, or a list of items
    (each a list of encoded elements) for SQ."""
    if vr == "SQ":
        body = b""
        for item in value:
            content = b"".join(sorted(item))
            body += struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content
    elif isinstance(value, str):
        body = value.encode("utf-8")
        if len(body) % 2:
            body += b"\0" if vr == "UI" else b" "
    else:
        body = value
        if len(body) % 2:
            body += b"\0"
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in LONG_LENGTH:
        head += b"\0\0" + struct.pack("<I", len(body))
    else:
        head += struct.pack("<H", len(body))
    return head + body


def part10(dataset, sop_class, sop_instance, ts):
    meta = b"".join([
        element(0x00020001, "OB", b"\x00\x01"),
        element(0x00020002, "UI", sop_class),
        element(0x00020003, "UI", sop_instance),
        element(0x00020010, "UI", ts),
        element(0x00020012, "UI", ROOT + ".0"),
    ])
    meta = element(0x00020000, "UL", struct.pack("<I", len(meta))) + meta
    return b"\0" * 128 + b"DICM" + meta + dataset


def zoo_uids():
    return {"Z": f"{ROOT}.9.1", "Zs": f"{ROOT}.9.1.1", "Zi": f"{ROOT}.9.1.1.1"}


def write_zoo(out, uids):
    u16 = lambda *v: struct.pack(f"<{len(v)}H", *v)
    nested = [
        element(0x00080100, "SH", "C1"),
        element(0x00080102, "SH", "DCM"),
        element(0x00080104, "LO", "Meaning ü"),
        element(0x0040A730, "SQ", [[element(0x00080104, "LO", "Deep")]]),
        element(0x00720060, "AT", u16(0x0008, 0x0100)),
        element(0x00720062, "CS", "A\\\\B"),
        element(0x00720064, "IS", "+9"),
        element(0x00720065, "OB", b"\x01\x02"),
        element(0x0072006A, "PN", "Nested^Name"),
        element(0x00720072, "DS", " 2.5\\+3"),
        element(0x0072007A, "US", u16(7, 8)),
    ]
    group8 = [
        element(0x00080005, "CS", "ISO_IR 192"),
        element(0x00080008, "CS", "ORIGINAL\\PRIMARY"),
        element(0x00080016, "UI", SC),
        element(0x00080018, "UI", uids["Zi"]),
        element(0x00080020, "DA", "20230301"),
        element(0x00080030, "TM", "120000"),
        element(0x00080050, "SH", ""),
        element(0x00080060, "CS", "OT"),
        element(0x00080090, "PN", ""),
        element(0x00081140, "SQ", []),
        element(0x00081161, "UL", b""),
    ]
    elements = group8 + [
        # A Group Length element, which the JSON model must not carry (F.2.2).
        element(0x00080000, "UL", struct.pack("<I", sum(len(e) for e in group8))),
        element(0x00090010, "LO", "KADE CONFORMANCE"),
        element(0x00091001, "UN", b"\x10\x20\x30\x40"),
        element(0x00100010, "PN", ""),
        element(0x00100020, "LO", "CONF-ZOO"),
        element(0x00100030, "DA", ""),
        element(0x00100040, "CS", ""),
        element(0x00180050, "DS", ""),
        element(0x00181271, "FD", b""),
        element(0x0020000D, "UI", uids["Z"]),
        element(0x0020000E, "UI", uids["Zs"]),
        element(0x00200010, "SH", ""),
        element(0x00200011, "IS", "1"),
        element(0x00200012, "IS", ""),
        element(0x00200013, "IS", "1"),
        element(0x00280002, "US", u16(1)),
        element(0x00280004, "CS", "MONOCHROME2"),
        element(0x00280009, "AT", b""),
        element(0x00280010, "US", u16(4)),
        element(0x00280011, "US", u16(4)),
        element(0x00280100, "US", u16(8)),
        element(0x00280101, "US", u16(8)),
        element(0x00280102, "US", u16(7)),
        element(0x00280103, "US", u16(0)),
        element(0x00282000, "OB", b""),
        element(0x0072005E, "AE", "KADE\\\\STORESCU"),
        element(0x0072005F, "AS", "042Y\\003M"),
        element(0x00720060, "AT", u16(0x0010, 0x0010, 0x7FE0, 0x0010)),
        element(0x00720061, "DA", "20200115\\19991231"),
        element(0x00720062, "CS", "ORIGINAL\\\\AXIAL"),
        element(0x00720063, "DT", "20200115103000.123456+0100\\2020"),
        element(0x00720064, "IS", " 42\\+7\\-3\\\\0"),
        element(0x00720065, "OB", b"\x00\x01\x02\xfe\xff\x80"),
        element(0x00720066, "LO", "Müller GmbH\\Second value"),
        element(0x00720067, "OF", struct.pack("<2f", 0.5, -1.0)),
        element(0x00720068, "LT", "Line one\r\nLine two \\ one value"),
        element(0x00720069, "OW", u16(1, 2, 0xFFFF)),
        element(0x0072006A, "PN", "Yamada^Tarou=山田^太郎=やまだ^たろう\\\\Doe^John\\=山田^花子"),
        element(0x0072006B, "TM", "103000.123\\0700"),
        element(0x0072006C, "SH", "ABC\\def"),
        element(0x0072006D, "UN", b"\x01\x02\x03\x04"),
        element(0x0072006E, "ST", "Short text \\ one value"),
        element(0x0072006F, "UC", "Unlimited one\\Unlimited two"),
        element(0x00720070, "UT", "Unlimited text \\ one value"),
        element(0x00720071, "UR", "https://example.invalid/a%20b?x=1"),
        element(0x00720072, "DS", " 1.5\\+1\\.5\\1.\\1e3\\\\-2.5E-1"),
        element(0x00720073, "OD", struct.pack("<2d", 1.5, -2.0)),
        element(0x00720074, "FD", struct.pack("<2d", 1.2345678901234567, -1e-300)),
        element(0x00720075, "OL", struct.pack("<2I", 1, 0xDEADBEEF)),
        element(0x00720076, "FL", struct.pack("<2f", 0.5, -2.25)),
        element(0x00720078, "UL", struct.pack("<2I", 0, 4294967295)),
        element(0x0072007A, "US", u16(0, 65535)),
        element(0x0072007C, "SL", struct.pack("<2i", -2147483648, 2147483647)),
        element(0x0072007E, "SS", struct.pack("<2h", -32768, 32767)),
        element(0x0072007F, "UI", "1.2.3\\" + EXPLICIT),
        element(0x00720080, "SQ", [nested, [], [element(0x00080100, "SH", "C3")]]),
        element(0x00720081, "OV", struct.pack("<2Q", 1, 2**64 - 1)),
        element(0x00720082, "SV", struct.pack("<3q", -2**63, 0, 2**53 + 1)),
        element(0x00720083, "UV", struct.pack("<3Q", 0, 2**64 - 1, 2**53 + 1)),
        element(0x7FE00010, "OB", bytes(range(16))),
    ]
    # Sorted by tag: the encoded elements begin with the little-endian group and element.
    elements.sort(key=lambda e: struct.unpack("<HH", e[:4]))
    path = os.path.join(out, "zoo.dcm")
    with open(path, "wb") as f:
        f.write(part10(b"".join(elements), SC, uids["Zi"], EXPLICIT))
    return [path]


# ---------------------------------------------------------------------------------------------
# The WADO-RS study: one instance per stored transfer syntax.
# ---------------------------------------------------------------------------------------------


def wado_uids():
    return {"W": f"{ROOT}.8.1", "Ws": f"{ROOT}.8.1.1", "W_implicit": f"{ROOT}.8.1.1.1",
            "W_explicit": f"{ROOT}.8.1.1.2", "W_rle": f"{ROOT}.8.1.1.3"}


def write_wado(out, uids, rle):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset

    files = []
    for i, (name, ts) in enumerate([("W_implicit", IMPLICIT), ("W_explicit", EXPLICIT)], 1):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = MR
        ds.SOPInstanceUID = uids[name]
        ds.StudyInstanceUID = uids["W"]
        ds.SeriesInstanceUID = uids["Ws"]
        ds.PatientName = "Wado^Test"
        ds.PatientID = "CONF-W"
        ds.StudyDate = "20220202"
        ds.Modality = "MR"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = struct.pack("<64H", *range(1000 * i, 1000 * i + 64))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = os.path.join(out, f"wado_{name}.dcm")
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    ds = pydicom.dcmread(rle)
    ds.SOPInstanceUID = uids["W_rle"]
    ds.file_meta.MediaStorageSOPInstanceUID = uids["W_rle"]
    ds.StudyInstanceUID = uids["W"]
    ds.SeriesInstanceUID = uids["Ws"]
    ds.PatientID = "CONF-W"
    ds.PatientName = "Wado^Test"
    ds.InstanceNumber = 3
    path = os.path.join(out, "wado_W_rle.dcm")
    ds.save_as(path, enforce_file_format=True)
    files.append(path)
    return files


def fixtures(a):
    os.makedirs(a.out, exist_ok=True)
    uids = {**corpus_uids(), **zoo_uids(), **wado_uids()}
    manifest = {
        "uids": uids,
        "files": {
            "corpus": write_corpus(a.out, uids),
            "zoo": write_zoo(a.out, uids),
            "wado": write_wado(a.out, uids, a.rle),
        },
    }
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


# ---------------------------------------------------------------------------------------------
# Standard clients: dicomweb-client for every search and metadata resource, pydicom strictly.
# ---------------------------------------------------------------------------------------------

FAILURES = []


def fail(msg):
    FAILURES.append(msg)
    print(f"FAIL: {msg}", file=sys.stderr)


def check_keys(obj, where):
    """PS3.18 F.2.2: keys are eight uppercase hex digits, in ascending order, no Group Length."""
    keys = list(obj.keys())
    if keys != sorted(keys):
        fail(f"{where}: attributes not in ascending order (F.2.2): {keys}")
    for k in keys:
        if len(k) != 8 or any(c not in "0123456789ABCDEF" for c in k):
            fail(f"{where}: attribute name {k!r} is not eight uppercase hex digits (F.2.2)")
        elif k.endswith("0000"):
            fail(f"{where}: Group Length {k} present (F.2.2 forbids it)")
        v = obj[k]
        if not isinstance(v, dict) or "vr" not in v:
            fail(f"{where}/{k}: no \"vr\" (F.2.2)")
            continue
        present = [n for n in ("Value", "BulkDataURI", "InlineBinary") if n in v]
        if len(present) > 1:
            fail(f"{where}/{k}: more than one of {present} (F.2.2)")
        if v["vr"] == "SQ":
            for i, item in enumerate(v.get("Value", [])):
                if not isinstance(item, dict):
                    fail(f"{where}/{k}/{i}: a sequence item is not an object (F.2.2)")
                else:
                    check_keys(item, f"{where}/{k}/{i}")


def strict_parse(client, obj, where):
    """Dataset.from_json with every warning an error and reading validation raising."""
    import pydicom
    from pydicom import config

    def bulk(tag, vr, uri):
        got = client.retrieve_bulkdata(uri)
        return bytes(got[0]) if got else b""

    check_keys(obj, where)
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = pydicom.Dataset.from_json(obj, bulk_data_uri_handler=bulk)
            for elem in ds.iterall():
                _ = elem.value, str(elem)
        return ds
    except Exception as e:  # noqa: BLE001 - any failure to read is the finding
        fail(f"{where}: pydicom Dataset.from_json (strict) failed: {type(e).__name__}: {e}")
        return None
    finally:
        config.settings.reading_validation_mode = old


def empty(v):
    return v is None or v == "" or v == b"" or (hasattr(v, "__len__") and len(v) == 0)


def same_values(orig, got, where):
    """The values pydicom reads from the stored file and from the JSON metadata agree."""
    from pydicom.multival import MultiValue

    for elem in orig:
        if elem.tag.element == 0 or elem.tag.group == 0x0002:
            continue
        if elem.tag not in got:
            fail(f"{where}: {elem.tag} ({elem.VR}) missing from the metadata")
            continue
        other = got[elem.tag]
        if elem.VR == "SQ":
            if len(elem.value) != len(other.value):
                fail(f"{where}: {elem.tag} has {len(other.value)} items, stored {len(elem.value)}")
                continue
            for i, (a, b) in enumerate(zip(elem.value, other.value)):
                same_values(a, b, f"{where}/{elem.tag}/{i}")
            continue
        a, b = elem.value, other.value
        if empty(a) and empty(b):
            continue
        norm = lambda v: [None if empty(x) else x for x in v] if isinstance(v, (list, MultiValue)) else v
        a, b = norm(a), norm(b)
        if elem.VR == "PN":
            a = [str(x) if x is not None else None for x in a] if isinstance(a, list) else str(a)
            b = [str(x) if x is not None else None for x in b] if isinstance(b, list) else str(b)
        if a != b:
            fail(f"{where}: {elem.tag} ({elem.VR}) is {b!r} in the metadata, stored {a!r}")


def clients(a):
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.verify = a.ca
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {a.token}"
    client = DICOMwebClient(url=a.url, session=session)
    with open(a.manifest) as f:
        manifest = json.load(f)
    u = manifest["uids"]

    def run(where, call):
        try:
            return call()
        except Exception as e:  # noqa: BLE001
            fail(f"{where}: dicomweb-client failed: {type(e).__name__}: {e}")
            return None

    searches = [
        ("search_for_studies()", lambda: client.search_for_studies()),
        ("search_for_studies(PatientName=M?ller*)",
         lambda: client.search_for_studies(search_filters={"PatientName": "M?ller*"})),
        ("search_for_studies(fields=all)", lambda: client.search_for_studies(fields=["all"])),
        ("search_for_series()", lambda: client.search_for_series()),
        ("search_for_series(Z)", lambda: client.search_for_series(u["Z"])),
        ("search_for_instances()", lambda: client.search_for_instances()),
        ("search_for_instances(Z, Zs, fields=all)",
         lambda: client.search_for_instances(u["Z"], u["Zs"], fields=["all"])),
    ]
    studies = set()
    for where, call in searches:
        got = run(where, call)
        if got is None:
            continue
        if not got:
            fail(f"{where}: no results")
        for i, obj in enumerate(got):
            ds = strict_parse(client, obj, f"{where}[{i}]")
            if ds is not None and "StudyInstanceUID" in ds:
                studies.add(ds.StudyInstanceUID)
    for st in sorted(studies):
        metas = run(f"retrieve_study_metadata({st})", lambda: client.retrieve_study_metadata(st))
        for i, obj in enumerate(metas or []):
            ds = strict_parse(client, obj, f"study metadata {st}[{i}]")
            if ds is None:
                continue
            se, sop = ds.SeriesInstanceUID, ds.SOPInstanceUID
            series = run(f"retrieve_series_metadata({se})",
                         lambda: client.retrieve_series_metadata(st, se))
            for j, s in enumerate(series or []):
                strict_parse(client, s, f"series metadata {se}[{j}]")
            inst = run(f"retrieve_instance_metadata({sop})",
                       lambda: client.retrieve_instance_metadata(st, se, sop))
            if inst is not None:
                got = strict_parse(client, inst, f"instance metadata {sop}")
                if got is not None and sop == u["Zi"]:
                    stored = pydicom.dcmread(manifest["files"]["zoo"][0])
                    same_values(stored, got, "zoo instance metadata")
    if u["Z"] not in studies:
        fail("the zoo study was not found by search_for_studies")
    print(f"dicomweb-client read {len(studies)} studies; {len(FAILURES)} failures")
    sys.exit(1 if FAILURES else 0)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixtures")
    f.add_argument("--out", required=True)
    f.add_argument("--rle", required=True)
    c = sub.add_parser("clients")
    c.add_argument("--url", required=True)
    c.add_argument("--token", required=True)
    c.add_argument("--ca", required=True)
    c.add_argument("--manifest", required=True)
    a = ap.parse_args()
    fixtures(a) if a.cmd == "fixtures" else clients(a)


if __name__ == "__main__":
    main()
