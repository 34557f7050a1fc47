"""The ceiling of the node's protocol library: pynetdicom set up as the node's listener sets
it up (its presentation contexts and their quick copy, TCP_NODELAY, the woken reactors, the
same maximum PDU), answering each C-STORE with one of two handlers:

- ``null``: success at once, nothing kept (what pynetdicom alone costs per instance);
- ``file``: the received bytes made durable as the spool makes them (a file created
  exclusively, written, fsynced, its directory fsynced), no database.

With the node and Orthanc in the same run (``bench/ingest.py --peers``), the differences say
where an instance's time goes: the protocol library, the durable file, the rows.

    python bench/pynetdicom_scp.py --port 11112 --mode file --out /tmp/x --ready /tmp/x/port
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pynetdicom import evt  # noqa: E402
from pynetdicom.events import Event  # noqa: E402

from ketanode.config import NodeSettings  # noqa: E402
from ketanode.dicom.net import set_nodelay  # noqa: E402
from ketanode.receive import wakeups  # noqa: E402
from ketanode.receive.listener import _Contexts, build_ae, handle_echo  # noqa: E402
from ketanode.spool import _fsync_dir, _write_new  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ae-title", default="CEILING")
    ap.add_argument("--mode", choices=("null", "file"), required=True)
    ap.add_argument("--out", type=Path, required=True, help="files (file) and the count file")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    files = args.out / "files"
    files.mkdir(exist_ok=True)
    count_file = args.out / "count"
    count = 0
    lock = threading.Lock()

    def store(event: Event) -> int:
        nonlocal count
        if args.mode == "file":
            data = event.encoded_dataset(include_meta=True)
            path = files / f"{uuid.uuid4().hex}.dcm"
            _write_new(path, data)
            _fsync_dir(files)
        with lock:
            count += 1
        return 0x0000

    stop = threading.Event()

    def publish() -> None:  # the count, for the benchmark's check (off the C-STORE path)
        while not stop.wait(0.1):
            with lock:
                value = count
            tmp = count_file.with_suffix(".tmp")
            tmp.write_text(str(value))
            os.replace(tmp, count_file)

    settings = NodeSettings(ae_title=args.ae_title, port=args.port)
    ae = build_ae(settings)
    wakeups.install()
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, set_nodelay),
        (evt.EVT_CONN_OPEN, wakeups.attach),
        (evt.EVT_CONN_CLOSE, wakeups.detach),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, store),
    ]
    server = ae.start_server(("127.0.0.1", args.port), block=False, evt_handlers=handlers)
    server.contexts = _Contexts(server.contexts)
    threading.Thread(target=publish, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a flag: shutdown() deadlocks here
    (args.out / "ready").write_text(str(args.port))
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
