#!/usr/bin/env python3
"""Character sets through every front end of a running Kade (PS3.5 6.1, Annexes H, I, J, K).

Stores pydicom's character-set samples (ISO 2022 IR 87 and IR 159 Japanese, IR 149 Korean,
GB18030 and UTF-8 Chinese, and the single-byte ISO_IR 100, 101.., 144, 126, 127, 138 sets)
with pynetdicom, plus an instance whose Study Description is Japanese, then checks with
pynetdicom (C-FIND) and dicomweb-client (QIDO-RS, WADO-RS metadata and instances) that:

- every name comes back as pydicom decodes it from the file (no escape sequences, no
  mojibake), in C-FIND answers and in DICOM JSON alike;
- matching works on the decoded text, with the request's own character set: a C-FIND whose
  identifier is in ISO 2022 IR 87 or IR 149 or GB18030 finds exactly the names it should, and
  `?` stands for one character, not one byte;
- the stored instances are returned as received.

Usage: charset_check.py --port P --url URL --token T --ca CERT FILE...
"""

import argparse
import io
import sys

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def japanese_description():
    """A secondary capture whose Study Description is Japanese, in ISO 2022 IR 87."""
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Sato^Hanako=佐藤^花子=さとう^はなこ"
    ds.PatientID = "CHARSET-JP"
    ds.StudyDescription = "胸部単純撮影"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = 2, 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(4)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def store(port, datasets):
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="KADE")
    check(assoc.is_established, "STORESCU association refused")
    for ds in datasets:
        status = assoc.send_c_store(ds)
        check(status and status.Status == 0, f"C-STORE of {ds.SOPInstanceUID}: {status}")
    assoc.release()


def find(port, charset, keys):
    """Study-level C-FIND; returns the matches' identifiers (decoded by pydicom)."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="KADE")
    check(assoc.is_established, "FINDSCU association refused")
    q = Dataset()
    if charset is not None:
        q.SpecificCharacterSet = charset
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.PatientName = ""
    q.StudyDescription = ""
    for k, v in keys.items():
        setattr(q, k, v)
    out = []
    for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
        check(status is not None, f"C-FIND {keys}: no response")
        if status.Status in (0xFF00, 0xFF01):
            check(ident is not None, f"C-FIND {keys}: pending without identifier")
            out.append(ident)
        else:
            check(status.Status == 0, f"C-FIND {keys}: status {status.Status:04X}")
    assoc.release()
    return out


def pn_json(name):
    """The DICOM JSON object of a decoded Person Name (PS3.18 F.2.2)."""
    groups = str(name).split("=")
    out = {}
    for key, g in zip(("Alphabetic", "Ideographic", "Phonetic"), groups):
        if g:
            out[key] = g
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()

    originals = {}
    for f in a.files:
        ds = pydicom.dcmread(f)
        originals[ds.StudyInstanceUID] = (f, ds)
    jp = japanese_description()
    originals[jp.StudyInstanceUID] = ("generated", jp)
    store(a.port, [ds for _, ds in originals.values()])

    # Every name and description, as C-FIND answers it, is what pydicom reads from the file.
    for study, (f, ds) in originals.items():
        got = find(a.port, None, {"StudyInstanceUID": study})
        check(len(got) == 1, f"{f}: {len(got)} matches by Study Instance UID")
        ident = got[0]
        check(ident.SpecificCharacterSet == "ISO_IR 192",
              f"{f}: answer in {ident.get('SpecificCharacterSet')!r}, not ISO_IR 192")
        check(str(ident.PatientName) == str(ds.PatientName),
              f"{f}: C-FIND PatientName {str(ident.PatientName)!r}, file {str(ds.PatientName)!r}")
        want = ds.get("StudyDescription") or ""
        check((ident.get("StudyDescription") or "") == want,
              f"{f}: C-FIND StudyDescription {ident.get('StudyDescription')!r}, file {want!r}")
        check("\x1b" not in str(ident.PatientName), f"{f}: escape sequence in the answer")

    def studies_of(*names):
        return {s for s, (f, _) in originals.items() if f.rsplit("/", 1)[-1] in names}

    # Matching on decoded text, with the request in the character set it names.
    cases = [
        (["", "ISO 2022 IR 87"], {"PatientName": "*山田*"}, studies_of("chrH31.dcm", "chrH32.dcm")),
        (["", "ISO 2022 IR 87"], {"PatientName": "*やまだ*"},
         studies_of("chrH31.dcm", "chrH32.dcm", "chrJapMulti.dcm")),
        (["", "ISO 2022 IR 87"], {"StudyDescription": "胸部*"}, {jp.StudyInstanceUID}),
        (["", "ISO 2022 IR 149"], {"PatientName": "*홍^길동*"}, studies_of("chrI2.dcm")),
        (["", "ISO 2022 IR 149"], {"PatientName": "김희중"}, studies_of("chrKoreanMulti.dcm")),
        ("GB18030", {"PatientName": "*王^小东*"}, studies_of("chrX2.dcm")),
        ("ISO_IR 192", {"PatientName": "*王^小東*"}, studies_of("chrX1.dcm")),
        (None, {"PatientName": "Wang^XiaoDong*"}, studies_of("chrX1.dcm", "chrX2.dcm")),
        # `?` is one character: é and ô are one each, whatever their bytes.
        ("ISO_IR 100", {"PatientName": "Buc^J?r?me"}, studies_of("chrFren.dcm")),
        ("ISO_IR 192", {"PatientName": "Buc^J?r?me"}, studies_of("chrFren.dcm")),
        ("ISO_IR 144", {"PatientName": "Люкceмбypг"}, studies_of("chrRuss.dcm")),
        ("ISO_IR 126", {"PatientName": "Διονυσιος"}, studies_of("chrGreek.dcm")),
    ]
    for charset, keys, want in cases:
        got = {i.StudyInstanceUID for i in find(a.port, charset, keys)}
        check(got == want, f"C-FIND {keys} in {charset}: {sorted(got)}, expected {sorted(want)}")

    session = requests.Session()
    session.verify = a.ca
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {a.token}"
    client = DICOMwebClient(url=a.url, session=session)

    # QIDO-RS matches the same decoded text, and answers it as DICOM JSON Person Names.
    for filters, want in [
        ({"PatientName": "*山田*"}, studies_of("chrH31.dcm", "chrH32.dcm")),
        ({"PatientName": "*홍^길동*"}, studies_of("chrI2.dcm")),
        ({"StudyDescription": "胸部*"}, {jp.StudyInstanceUID}),
        ({"PatientName": "Buc^J?r?me"}, studies_of("chrFren.dcm")),
    ]:
        found = client.search_for_studies(search_filters=filters)
        got = {s["0020000D"]["Value"][0] for s in found}
        check(got == want, f"QIDO {filters}: {sorted(got)}, expected {sorted(want)}")
        for s in found:
            _, ds = originals[s["0020000D"]["Value"][0]]
            check(s["00100010"]["Value"][0] == pn_json(ds.PatientName),
                  f"QIDO {filters}: {s['00100010']} for {str(ds.PatientName)!r}")
            pydicom.Dataset.from_json(s)

    for study, (f, ds) in originals.items():
        # Metadata: decoded names and descriptions, declared as UTF-8 where Kade decoded.
        meta = client.retrieve_study_metadata(study)
        check(len(meta) == 1, f"{f}: {len(meta)} instances in the metadata")
        m = meta[0]
        check("\\u001b" not in str(m) and "\x1b" not in str(m), f"{f}: escape in metadata")
        check(m["00100010"]["Value"][0] == pn_json(ds.PatientName),
              f"{f}: metadata PatientName {m['00100010']} for {str(ds.PatientName)!r}")
        if "StudyDescription" in ds:
            check(m["00081030"]["Value"][0] == ds.StudyDescription,
                  f"{f}: metadata StudyDescription {m['00081030']}")
        parsed = pydicom.Dataset.from_json(m)
        check(str(parsed.PatientName) == str(ds.PatientName),
              f"{f}: metadata parsed by pydicom gives {str(parsed.PatientName)!r}")
        # The instance itself is returned as stored: its own character set, its own bytes.
        inst = client.retrieve_instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        check(inst.get("SpecificCharacterSet") == ds.get("SpecificCharacterSet"),
              f"{f}: retrieved instance declares {inst.get('SpecificCharacterSet')!r}")
        check(str(inst.PatientName) == str(ds.PatientName),
              f"{f}: retrieved instance PatientName {str(inst.PatientName)!r}")
    print(f"charset check passed: {len(originals)} studies, {len(cases)} C-FIND matching cases")


if __name__ == "__main__":
    main()
