#!/usr/bin/env python3
"""Drives a running Kade with dicomweb-client (a DICOMweb client nobody at Kade wrote).

Stores the given files with STOW-RS, then checks QIDO-RS searches against what pydicom reads
from the same files, retrieves every instance with WADO-RS and compares it element by element
with the file, and checks series metadata and frames. Exits non-zero on the first mismatch.

Usage: dicomweb_client_check.py --url https://127.0.0.1:PORT/dicom-web --token T --ca CERT FILE...
"""

import argparse
import sys
from collections import defaultdict

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def value(js, tag):
    v = js.get(tag, {}).get("Value")
    return v[0] if v else None


def make_named(name, description, study_uid=None):
    """A small secondary-capture instance in UTF-8 with the given patient name."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = name
    ds.PatientID = "DW-" + ds.SOPInstanceUID[-8:]
    ds.StudyDescription = description
    ds.Modality = "OT"
    ds.StudyDate = "20240102"
    ds.Rows, ds.Columns = 4, 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(16))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()

    session = requests.Session()
    session.verify = a.ca
    # REQUESTS_CA_BUNDLE in the environment would otherwise win over session.verify.
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {a.token}"
    client = DICOMwebClient(url=a.url, session=session)

    originals = [pydicom.dcmread(f) for f in a.files]
    muller = make_named("Müller^Jürgen", "Brain MR")
    moller = make_named("Möller^Jan", "brain mr")
    originals += [muller, moller]
    by_sop = {ds.SOPInstanceUID: ds for ds in originals}
    check(len(by_sop) == len(originals), "test files must have distinct SOP Instance UIDs")

    # STOW-RS, a few instances per request.
    for i in range(0, len(originals), 5):
        batch = originals[i : i + 5]
        try:
            resp = client.store_instances(batch)
        except requests.HTTPError as e:
            fail(f"STOW-RS {e}: {e.response.text} {e.response.headers.get('Warning')}")
        refs = {item.ReferencedSOPInstanceUID for item in resp.get("ReferencedSOPSequence", [])}
        failed = resp.get("FailedSOPSequence", [])
        check(not failed, f"STOW-RS failed for {[f.ReferencedSOPInstanceUID for f in failed]}")
        check(refs == {ds.SOPInstanceUID for ds in batch}, f"STOW-RS referenced {refs}")
    print(f"stored {len(originals)} instances with STOW-RS")

    # QIDO-RS: studies, series, instances against pydicom's reading.
    studies = defaultdict(lambda: defaultdict(set))
    for ds in originals:
        studies[ds.StudyInstanceUID][ds.SeriesInstanceUID].add(ds.SOPInstanceUID)
    found = {value(s, "0020000D"): s for s in client.search_for_studies()}
    check(set(found) == set(studies), f"studies: {sorted(found)} != {sorted(studies)}")
    for st, series in studies.items():
        s = found[st]
        check(value(s, "00201206") == len(series), f"{st}: NumberOfStudyRelatedSeries")
        n = sum(len(v) for v in series.values())
        check(value(s, "00201208") == n, f"{st}: NumberOfStudyRelatedInstances")
        got_series = {value(x, "0020000E") for x in client.search_for_series(st)}
        check(got_series == set(series), f"{st}: series {got_series} != {set(series)}")
        for se, sops in series.items():
            got = {value(x, "00080018") for x in client.search_for_instances(st, se)}
            check(got == sops, f"{st}/{se}: instances {got} != {sops}")
    print(f"QIDO-RS matches pydicom for {len(studies)} studies")

    # Matching rules: '?' is one character (also a non-ASCII one), PN is case-insensitive,
    # other strings are case-sensitive; values are percent-encoded UTF-8 on the wire.
    def study_set(**filters):
        return {value(s, "0020000D") for s in client.search_for_studies(search_filters=filters)}

    check(study_set(PatientName="M?ller*") == {muller.StudyInstanceUID, moller.StudyInstanceUID},
          "M?ller* must find Müller and Möller")
    check(study_set(PatientName="m?ller^j*") == {muller.StudyInstanceUID, moller.StudyInstanceUID},
          "PN matching is case-insensitive")
    check(study_set(PatientName="Müller^Jürgen") == {muller.StudyInstanceUID}, "exact UTF-8 name")
    check(study_set(PatientName="MULLER*") == set(), "MULLER* must not match Müller")
    check(study_set(StudyDescription="Brain*") == {muller.StudyInstanceUID},
          "StudyDescription matching is case-sensitive")
    check(study_set(StudyDate="20240101-20240103") >= {muller.StudyInstanceUID}, "date range")
    check(muller.StudyInstanceUID not in study_set(StudyDate="20240103-"), "open date range")
    page1 = client.search_for_studies(limit=2, offset=0)
    page2 = client.search_for_studies(limit=2, offset=2)
    check(len(page1) == 2 and not ({value(s, "0020000D") for s in page1}
                                   & {value(s, "0020000D") for s in page2}), "limit/offset")
    name_json = client.search_for_studies(search_filters={"PatientName": "Müller*"})[0]["00100010"]
    check(name_json["Value"][0]["Alphabetic"] == "Müller^Jürgen", f"PN JSON {name_json}")
    print("QIDO-RS matching rules hold")

    # WADO-RS: every instance, element by element against the file.
    for ds in originals:
        got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        check(got.SOPInstanceUID == ds.SOPInstanceUID, "retrieved the wrong instance")
        # Group lengths (gggg,0000) are dropped by pydicom's writer on the way out.
        sent = [e for e in ds if e.tag.group != 0x0002 and e.tag.element != 0]
        for elem in sent:
            other = got.get(elem.tag)
            check(other is not None, f"{ds.SOPInstanceUID}: {elem.tag} missing after retrieve")
            if elem.VR != "SQ":
                check(other.value == elem.value, f"{ds.SOPInstanceUID}: {elem.tag} differs")
        check(len([e for e in got if e.tag.element != 0]) == len(sent),
              f"{ds.SOPInstanceUID}: element count differs")
    print(f"WADO-RS returned {len(originals)} instances equal to the files")

    # Metadata: every instance of each series, pixel data as a BulkDataURI.
    for st, series in studies.items():
        for se, sops in series.items():
            meta = client.retrieve_series_metadata(st, se)
            check({value(m, "00080018") for m in meta} == sops, f"{se}: metadata instances")
            for m in meta:
                if "7FE00010" in m:
                    check("BulkDataURI" in m["7FE00010"], "pixel data must be a BulkDataURI")
                    check("InlineBinary" not in m["7FE00010"], "pixel data must not be inlined")
    print("WADO-RS metadata complete")

    # Frames of an uncompressed single-frame image: the pixel data itself.
    for ds in originals:
        if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian or "PixelData" not in ds:
            continue
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            continue
        frames = client.retrieve_instance_frames(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[1],
            media_types=(("application/octet-stream", "*"),))
        check(len(frames) == 1 and frames[0] == ds.PixelData, f"{ds.SOPInstanceUID}: frame 1")
    print("WADO-RS frames equal the pixel data")
    # Transfer syntax on request: native syntaxes are re-encoded, compressed ones refused.
    from pydicom.uid import ImplicitVRLittleEndian
    implicit = next(ds for ds in originals if ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
                    and "PixelData" in ds)
    got = client.retrieve_instance(implicit.StudyInstanceUID, implicit.SeriesInstanceUID,
                                   implicit.SOPInstanceUID,
                                   media_types=(("application/dicom", ExplicitVRLittleEndian),))
    check(got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, "not re-encoded")
    check(got.PixelData == implicit.PixelData, "pixel data changed by re-encoding")
    # Compressed instances are decompressed on request: every 8-bit baseline JPEG one must come
    # back as Explicit VR LE, RGB when it has colour, with pixel values within a few units of
    # pydicom's own decoding (Pillow/libjpeg; two JPEG decoders differ by rounding only).
    import numpy as np
    jpegs = [ds for ds in originals
             if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
             # RGB JPEGs without the colour transform: Pillow applies YCbCr regardless,
             # so pydicom's decoding is not a reference for them.
             and "no_color_transform" not in ds.filename]
    check(len(jpegs) > 0, "the corpus must hold baseline JPEG instances")
    for ds in jpegs:
        got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                       media_types=(("application/dicom", ExplicitVRLittleEndian),))
        check(got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian,
              f"{ds.SOPInstanceUID}: not decompressed")
        if int(ds.SamplesPerPixel) == 3:
            check(got.PhotometricInterpretation == "RGB", f"{ds.filename}: not RGB")
        mine = got.pixel_array.astype(np.int32)
        theirs = ds.pixel_array.astype(np.int32)
        check(mine.shape == theirs.shape, f"{ds.filename}: shape {mine.shape} vs {theirs.shape}")
        worst = int(np.abs(mine - theirs).max())
        check(worst <= 10, f"{ds.filename}: decompressed pixels differ from pydicom's by {worst}")
    # What Kade cannot decode (12-bit JPEG Extended) is refused with 406 before anything is sent.
    twelve = [ds for ds in originals
              if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
              and int(ds.BitsAllocated) > 8]
    check(len(twelve) > 0, "the corpus must hold a 12-bit JPEG instance")
    for ds in twelve:
        r = session.get(f"{a.url}/studies/{ds.StudyInstanceUID}/series/"
                        f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
                        headers={"Accept": 'multipart/related; type="application/dicom"; '
                                           f"transfer-syntax={ExplicitVRLittleEndian}"})
        check(r.status_code == 406, f"12-bit JPEG to Explicit VR LE gave {r.status_code}")
    print(f"WADO-RS re-encodes native instances, decompresses {len(jpegs)} JPEG instances "
          f"(close to pydicom's decoding), refuses {len(twelve)} 12-bit JPEG")

    # Rendered and thumbnail: the window arithmetic of PS3.3 C.11.2.1.2, checked with numpy.
    import io

    import numpy as np
    from PIL import Image

    ct = next(ds for ds in originals
              if ds.get("PhotometricInterpretation") == "MONOCHROME2"
              and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
              and ds.get("BitsAllocated") == 16
              and int(getattr(ds, "NumberOfFrames", 1) or 1) == 1)
    ids = (ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    c, w = 40.0, 400.0
    png = client.retrieve_instance_rendered(*ids, media_types=("image/png",),
                                            params={"window": "40,400"})
    img = np.asarray(Image.open(io.BytesIO(png)))
    check(img.shape == (ct.Rows, ct.Columns), f"rendered PNG shape {img.shape}")
    v = ct.pixel_array.astype(float) * float(getattr(ct, "RescaleSlope", 1)) + float(
        getattr(ct, "RescaleIntercept", 0))
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    want = np.clip(((v - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)
    want = np.where(v <= lo, 0, np.where(v > hi, 255, want))
    diff = np.abs(img.astype(float) - want)
    check(diff.max() <= 1.0, f"rendered pixels differ from the window formula by up to {diff.max()}")
    check(len(np.unique(img)) > 16, "the rendered image is flat")
    white = np.asarray(Image.open(io.BytesIO(client.retrieve_instance_rendered(
        *ids, media_types=("image/png",), params={"window": "-100000,1"}))))
    check((white == 255).all(), "a window below every value must render white")
    jpeg = client.retrieve_instance_rendered(*ids, params={"viewport": "64,64", "quality": "80"})
    check(jpeg[:2] == b"\xff\xd8", "JPEG expected by default")
    check(Image.open(io.BytesIO(jpeg)).size == (64, 64), "viewport")
    for path in (f"studies/{ids[0]}/series/{ids[1]}/instances/{ids[2]}/thumbnail",
                 f"studies/{ids[0]}/series/{ids[1]}/thumbnail",
                 f"studies/{ids[0]}/thumbnail"):
        r = session.get(f"{a.url}/{path}", headers={"Accept": "image/jpeg"})
        check(r.status_code == 200, f"{path}: {r.status_code} {r.text[:200]}")
        t = Image.open(io.BytesIO(r.content))
        check(max(t.size) == 128, f"{path}: thumbnail size {t.size}")
    print("WADO-RS rendered and thumbnail match the window formula")
    print("OK")


if __name__ == "__main__":
    main()
