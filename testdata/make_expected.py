#!/usr/bin/env python3
"""Writes expected.json: what an independent DICOM reader (pydicom) sees in each test file.

The end-to-end tests compare what Kade indexed against these values, so that Kade's own
parsing is never the judge of itself. Re-run after adding files:  python3 make_expected.py
"""
import json
import pathlib

import pydicom

HERE = pathlib.Path(__file__).parent


def text(ds, kw):
    v = ds.get(kw)
    if v is None or v == "":
        return None
    return str(v)


def num(ds, kw):
    v = ds.get(kw)
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


out = {}
for d in ["pydicom", "pydicom-charset"]:
    for f in sorted((HERE / d).glob("*.dcm")):
        entry = {"file": f"{d}/{f.name}"}
        try:
            ds = pydicom.dcmread(f)
            meta = ds.file_meta
            entry.update(
                readable=True,
                has_meta="TransferSyntaxUID" in meta,
                transfer_syntax=str(meta.get("TransferSyntaxUID", "")) or None,
                sop_class_uid=text(ds, "SOPClassUID"),
                sop_instance_uid=text(ds, "SOPInstanceUID"),
                study_uid=text(ds, "StudyInstanceUID"),
                series_uid=text(ds, "SeriesInstanceUID"),
                patient_id=text(ds, "PatientID"),
                patient_name=text(ds, "PatientName"),
                modality=text(ds, "Modality"),
                rows=num(ds, "Rows"),
                columns=num(ds, "Columns"),
                number_of_frames=num(ds, "NumberOfFrames"),
            )
        except Exception as e:  # unreadable on purpose (truncated, no meta...)
            entry.update(readable=False, error=str(e)[:200])
        out[entry["file"]] = entry

(HERE / "expected.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
print(f"wrote {len(out)} entries")
