"""A minimal C-FIND SCU for benchmarks: it negotiates one association (Study Root FIND,
Implicit VR Little Endian), sends C-FIND requests and reads the responses' PDUs without
decoding the matches (it only reads each response command's Status). So the time it measures
is the server's, not the client's: DCMTK findscu spends about 50 µs of CPU decoding each
match and pynetdicom about 1.7 ms, which for answers of hundreds of matches is more than the
server's own work.

Used by bench/qr.py; it runs alone too:

  python3 bench/rawfind.py HOST PORT CALLED_AE [KEY=VALUE ...]
"""

import socket
import struct
import sys
import time

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1.1"
MAX_PDU = 1 << 20


def _uid(u):
    b = u.encode()
    return b + b"\0" if len(b) % 2 else b


def _item(kind, body):
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _element(group, elem, value):
    return struct.pack("<HHI", group, elem, len(value)) + value


def _command(message_id):
    body = (_element(0, 0x0002, _uid(STUDY_ROOT_FIND))
            + _element(0, 0x0100, struct.pack("<H", 0x0020))
            + _element(0, 0x0110, struct.pack("<H", message_id))
            + _element(0, 0x0700, struct.pack("<H", 0))
            + _element(0, 0x0800, struct.pack("<H", 0x0102)))
    return _element(0, 0x0000, struct.pack("<I", len(body))) + body


def _pdata(pc, flags, data):
    pdv = struct.pack(">IBB", len(data) + 2, pc, flags) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _status(command):
    """The Status (0000,0900) of an Implicit VR Little Endian command set."""
    i = 0
    while i + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, i)
        if (group, elem) == (0, 0x0900):
            return struct.unpack_from("<H", command, i + 8)[0]
        i += 8 + length
    raise ValueError("a response without Status")


class RawFind:
    def __init__(self, host, port, called, calling="BENCHSCU"):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb", buffering=1 << 20)
        pc = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, STUDY_ROOT_FIND.encode())
                   + _item(0x40, IMPLICIT_LE.encode()))
        user = _item(0x50, _item(0x51, struct.pack(">I", MAX_PDU))
                     + _item(0x52, IMPLEMENTATION_UID.encode()))
        body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
                + bytes(32) + _item(0x10, APPLICATION_CONTEXT.encode()) + pc + user)
        self.sock.sendall(struct.pack(">BBI", 0x01, 0, len(body)) + body)
        kind, body = self._pdu()
        if kind != 0x02:
            raise RuntimeError(f"{called} refused the association (PDU type {kind:#x})")
        self.peer_max = 0
        self.pc = None
        i = 68
        while i + 4 <= len(body):
            t, _, n = struct.unpack_from(">BBH", body, i)
            item = body[i + 4:i + 4 + n]
            if t == 0x21 and item[2] == 0:
                self.pc = item[0]
            if t == 0x50:
                j = 0
                while j + 4 <= len(item):
                    st, _, sn = struct.unpack_from(">BBH", item, j)
                    if st == 0x51:
                        self.peer_max = struct.unpack_from(">I", item, j + 4)[0]
                    j += 4 + sn
            i += 4 + n
        if self.pc is None:
            raise RuntimeError(f"{called} accepted no presentation context for C-FIND")
        self.message_id = 0

    def _pdu(self):
        head = self.file.read(6)
        if len(head) < 6:
            raise RuntimeError("the connection closed")
        kind, _, n = struct.unpack(">BBI", head)
        return kind, self.file.read(n)

    def find(self, ds):
        """Sends one C-FIND-RQ with `ds` (a pydicom Dataset) and returns (matches, status,
        seconds to the final response)."""
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)
        identifier = fp.getvalue()
        self.message_id += 1
        max_data = (self.peer_max or len(identifier) + 12) - 6
        wire = _pdata(self.pc, 0x03, _command(self.message_id))
        for k in range(0, len(identifier), max_data):
            part = identifier[k:k + max_data]
            wire += _pdata(self.pc, 0x02 if k + max_data >= len(identifier) else 0x00, part)
        t0 = time.perf_counter()
        self.sock.sendall(wire)
        matches, command = 0, b""
        while True:
            kind, body = self._pdu()
            if kind != 0x04:
                raise RuntimeError(f"unexpected PDU type {kind:#x} during C-FIND")
            i = 0
            while i < len(body):
                n, _, flags = struct.unpack_from(">IBB", body, i)
                if flags & 1:
                    command += body[i + 6:i + 4 + n]
                    if flags & 2:
                        status = _status(command)
                        command = b""
                        if status in (0xFF00, 0xFF01):
                            matches += 1
                        else:
                            return matches, status, time.perf_counter() - t0
                i += 4 + n

    def release(self):
        self.sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
        try:
            self._pdu()
        finally:
            self.sock.close()


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    host, port, called = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for k in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "ModalitiesInStudy"):
        setattr(ds, k, "")
    for kv in sys.argv[4:]:
        k, v = kv.split("=", 1)
        setattr(ds, k, v)
    c = RawFind(host, port, called)
    for _ in range(5):
        matches, status, dt = c.find(ds)
        print(f"{matches} matches, status {status:#06x}, {dt * 1000:.2f} ms")
    c.release()


if __name__ == "__main__":
    main()
