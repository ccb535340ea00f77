#!/usr/bin/env python3
"""Drives a running Kade with pynetdicom (a DICOM toolkit nobody at Kade wrote).

C-ECHO and C-STORE of the given files, C-FIND (Study Root and Patient Root, STUDY / SERIES /
IMAGE levels) checked against what pydicom reads from the same files, C-GET of a series into
this process and C-MOVE of a study to a storage SCP run here, both compared byte for byte on
the pixel data, and a store-only peer refused for C-FIND. Exits non-zero on the first mismatch.

Usage: pynetdicom_check.py --port P --move-port Q FILE...
(Kade's AE title is KADE; this script uses the peers STORESCU, FINDSCU, GETSCU, MOVESCU, and
listens as PYSTORE on --move-port, which the test registers as a C-MOVE destination.)
"""

import argparse
import sys
import threading
from collections import defaultdict

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def associate(ae_title, port, contexts, roles=None, handlers=None):
    ae = AE(ae_title=ae_title)
    for c in contexts:
        if isinstance(c, tuple):
            ae.add_requested_context(*c)
        else:
            ae.add_requested_context(c)
    assoc = ae.associate("127.0.0.1", port, ae_title="KADE", ext_neg=roles or [],
                         evt_handlers=handlers or [])
    return assoc


def find(port, model, level, keys, aet="FINDSCU"):
    assoc = associate(aet, port, [model])
    if not assoc.is_established:
        return None
    q = Dataset()
    q.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(q, k, v)
    out, final = [], None
    try:
        for status, ident in assoc.send_c_find(q, model):
            if status is None:
                fail("C-FIND: no response")
            if status.Status in (0xFF00, 0xFF01):
                out.append(ident)
            else:
                final = status.Status
    finally:
        assoc.release()
    return out if final == 0 else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--move-port", type=int, required=True)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    files = [pydicom.dcmread(f) for f in a.files]

    # C-ECHO
    assoc = associate("STORESCU", a.port, [Verification])
    check(assoc.is_established, "STORESCU could not associate")
    check(assoc.send_c_echo().Status == 0, "C-ECHO failed")
    assoc.release()

    # C-STORE, each instance in its own transfer syntax.
    contexts = sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in files})
    assoc = associate("STORESCU", a.port, [(c, [t]) for c, t in contexts])
    check(assoc.is_established, "STORESCU could not associate for storage")
    for ds in files:
        st = assoc.send_c_store(ds)
        check(st and st.Status == 0, f"C-STORE of {ds.SOPInstanceUID}: {st}")
    assoc.release()
    print(f"stored {len(files)} instances with pynetdicom")

    tree = defaultdict(lambda: defaultdict(set))
    for ds in files:
        tree[ds.StudyInstanceUID][ds.SeriesInstanceUID].add(ds.SOPInstanceUID)

    # C-FIND, Study Root, at every level.
    studies = find(a.port, StudyRootQueryRetrieveInformationModelFind, "STUDY",
                   {"StudyInstanceUID": "", "PatientName": "", "ModalitiesInStudy": "",
                    "NumberOfStudyRelatedInstances": ""})
    check(studies is not None, "STUDY C-FIND failed")
    got = {s.StudyInstanceUID for s in studies}
    check(got == set(tree), f"studies {got} != {set(tree)}")
    for s in studies:
        n = sum(len(v) for v in tree[s.StudyInstanceUID].values())
        check(int(s.NumberOfStudyRelatedInstances) == n, "NumberOfStudyRelatedInstances")
    muller = [ds for ds in files if str(ds.PatientName).startswith("Müller")]
    check(muller, "the test needs a Müller")
    hits = find(a.port, StudyRootQueryRetrieveInformationModelFind, "STUDY",
                {"StudyInstanceUID": "", "PatientName": "m?ller*",
                 "SpecificCharacterSet": "ISO_IR 192"})
    check({h.StudyInstanceUID for h in hits} == {ds.StudyInstanceUID for ds in muller},
          "m?ller* must find Müller (one character, case-insensitive)")
    check(any(str(h.PatientName) == "Müller^Jürgen" for h in hits) or
          all("PatientName" not in h for h in hits), "PN decoded wrongly")
    for st, series in tree.items():
        got = find(a.port, StudyRootQueryRetrieveInformationModelFind, "SERIES",
                   {"StudyInstanceUID": st, "SeriesInstanceUID": "", "Modality": ""})
        check({x.SeriesInstanceUID for x in got} == set(series), f"{st}: series")
        for se, sops in series.items():
            got = find(a.port, StudyRootQueryRetrieveInformationModelFind, "IMAGE",
                       {"StudyInstanceUID": st, "SeriesInstanceUID": se, "SOPInstanceUID": ""})
            check({x.SOPInstanceUID for x in got} == sops, f"{se}: instances")
    # Patient Root: studies of one patient.
    pid = muller[0].PatientID
    got = find(a.port, PatientRootQueryRetrieveInformationModelFind, "STUDY",
               {"PatientID": pid, "StudyInstanceUID": ""})
    check({x.StudyInstanceUID for x in got} == {ds.StudyInstanceUID for ds in files
                                                if ds.PatientID == pid}, "Patient Root")
    print("C-FIND matches pydicom at STUDY, SERIES and IMAGE level")

    # A store-only peer gets no C-FIND.
    check(find(a.port, StudyRootQueryRetrieveInformationModelFind, "STUDY",
               {"StudyInstanceUID": ""}, aet="STORESCU") is None,
          "a store-only peer could query")

    by_sop = {ds.SOPInstanceUID: ds for ds in files}

    def same(ds):
        orig = by_sop[ds.SOPInstanceUID]
        return ds.get("PixelData") == orig.get("PixelData") and ds.PatientID == orig.PatientID

    # C-GET a series into this process.
    st = muller[0].StudyInstanceUID
    se = muller[0].SeriesInstanceUID
    received = []

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    classes = sorted({ds.SOPClassUID for ds in files})
    ts = sorted({ds.file_meta.TransferSyntaxUID for ds in files})
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for c in classes:
        ae.add_requested_context(c, ts)
    roles = [build_role(c, scp_role=True) for c in classes]
    assoc = ae.associate("127.0.0.1", a.port, ae_title="KADE", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    check(assoc.is_established, "GETSCU could not associate")
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = st
    q.SeriesInstanceUID = se
    final = None
    for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
        if status and status.Status not in (0xFF00,):
            final = status
    assoc.release()
    check(final is not None and final.Status == 0, f"C-GET final status {final}")
    check({d.SOPInstanceUID for d in received} == tree[st][se], "C-GET instances")
    check(all(same(d) for d in received), "C-GET pixel data differs")
    print(f"C-GET returned {len(received)} instances, identical")

    # C-MOVE a study to a storage SCP run here.
    moved = []
    scp = AE(ae_title="PYSTORE")
    for c in classes:
        scp.add_supported_context(c, ts)
    server = scp.start_server(("127.0.0.1", a.move_port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE,
                                             lambda e: (moved.append(e.dataset), 0)[1])])
    try:
        assoc = associate("MOVESCU", a.port, [StudyRootQueryRetrieveInformationModelMove])
        check(assoc.is_established, "MOVESCU could not associate")
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = st
        final = None
        for status, _ in assoc.send_c_move(q, "PYSTORE", StudyRootQueryRetrieveInformationModelMove):
            if status and status.Status != 0xFF00:
                final = status
        assoc.release()
        check(final is not None and final.Status == 0, f"C-MOVE final status {final}")
        expect = set().union(*tree[st].values())
        check({d.SOPInstanceUID for d in moved} == expect, "C-MOVE instances")
        check(all(same(d) for d in moved), "C-MOVE pixel data differs")
        print(f"C-MOVE delivered {len(moved)} instances, identical")
        # An unknown destination: A801.
        assoc = associate("MOVESCU", a.port, [StudyRootQueryRetrieveInformationModelMove])
        statuses = [s.Status for s, _ in assoc.send_c_move(
            q, "NOWHERE", StudyRootQueryRetrieveInformationModelMove) if s]
        assoc.release()
        check(statuses and statuses[-1] == 0xA801, f"unknown destination gave {statuses}")
        # C-CANCEL mid-move: the largest study, cancelled after the first pending response.
        big = max(tree, key=lambda k: sum(len(v) for v in tree[k].values()))
        total = sum(len(v) for v in tree[big].values())
        moved.clear()
        assoc = associate("MOVESCU", a.port, [StudyRootQueryRetrieveInformationModelMove])
        ctx = assoc.accepted_contexts[0].context_id
        q.StudyInstanceUID = big
        final, sent_cancel = None, False
        for status, _ in assoc.send_c_move(q, "PYSTORE", StudyRootQueryRetrieveInformationModelMove,
                                           msg_id=77):
            if status and status.Status == 0xFF00 and not sent_cancel:
                assoc.send_c_cancel(77, ctx)
                sent_cancel = True
            elif status and status.Status != 0xFF00:
                final = status
        assoc.release()
        check(final is not None and final.Status == 0xFE00, f"cancelled C-MOVE ended with {final}")
        check(int(final.NumberOfRemainingSuboperations) > 0, "nothing left after the cancel?")
        check(len(moved) < total, f"all {total} moved despite the cancel")
        print(f"C-CANCEL stopped a C-MOVE after {len(moved)} of {total} instances")
    finally:
        server.shutdown()

    # C-CANCEL mid-get: the store handler is slow, so the cancel arrives between sub-operations.
    received.clear()

    def slow_store(event):
        import time
        time.sleep(0.05)
        received.append(event.dataset)
        return 0x0000

    assoc = ae.associate("127.0.0.1", a.port, ae_title="KADE", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, slow_store)])
    ctx = [c for c in assoc.accepted_contexts
           if c.abstract_syntax == StudyRootQueryRetrieveInformationModelGet][0].context_id
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = big
    final, sent_cancel = None, False
    for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet, msg_id=78):
        if status and status.Status == 0xFF00 and not sent_cancel:
            assoc.send_c_cancel(78, ctx)
            sent_cancel = True
        elif status and status.Status != 0xFF00:
            final = status
    assoc.release()
    check(final is not None and final.Status == 0xFE00, f"cancelled C-GET ended with {final}")
    check(len(received) < total, f"all {total} received despite the cancel")
    print(f"C-CANCEL stopped a C-GET after {len(received)} of {total} instances")

    # Storage Commitment: every stored instance plus one Kade never received.
    import time

    from pydicom.uid import generate_uid
    from pynetdicom.sop_class import StorageCommitmentPushModel
    reports = []

    def on_report(event):
        reports.append((event.event_type, event.event_information))
        return 0x0000, None

    ae = AE(ae_title="COMMITSCU")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", a.port, ae_title="KADE",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    check(assoc.is_established, "COMMITSCU could not associate")
    req = Dataset()
    req.TransactionUID = generate_uid()
    missing = generate_uid()
    items = []
    for ds in files[:5] + [None]:
        it = Dataset()
        it.ReferencedSOPClassUID = ds.SOPClassUID if ds else files[0].SOPClassUID
        it.ReferencedSOPInstanceUID = ds.SOPInstanceUID if ds else missing
        items.append(it)
    req.ReferencedSOPSequence = items
    status, _ = assoc.send_n_action(req, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    check(status is not None and status.Status == 0, f"N-ACTION status {status}")
    for _ in range(200):
        if reports:
            break
        time.sleep(0.05)
    assoc.release()
    check(reports, "no N-EVENT-REPORT on the association")
    event_type, info = reports[0]
    check(event_type == 2, f"event type {event_type}: one instance is missing, so 2 expected")
    check(info.TransactionUID == req.TransactionUID, "transaction UID")
    ok = {x.ReferencedSOPInstanceUID for x in info.ReferencedSOPSequence}
    check(ok == {ds.SOPInstanceUID for ds in files[:5]}, f"committed {ok}")
    bad = [(x.ReferencedSOPInstanceUID, x.FailureReason) for x in info.FailedSOPSequence]
    check(bad == [(missing, 0x0112)], f"failed {bad}")
    # A peer without the commit permission gets no Storage Commitment context.
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", a.port, ae_title="KADE")
    check(not assoc.is_established or not assoc.accepted_contexts,
          "a peer without the commit permission got a Storage Commitment context")
    if assoc.is_established:
        assoc.release()
    print("Storage Commitment: 5 committed after re-hashing, the unknown instance failed (0112)")
    print("OK")


if __name__ == "__main__":
    main()
