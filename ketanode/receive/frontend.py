"""The native front end: ``ketanode-scp`` answers C-STOREs, this process indexes its files.

``node.receiver = "dcmtk"``. The front end (``frontend/ketanode-scp.cc``, DCMTK's SCP
classes, a thread per association) writes each received dataset as a Part-10 file in
``<spool>/incoming/<listener>/``, fsyncs it, renames it from ``.part`` to ``.dcm``, fsyncs
the directory, and only then answers success. It reports what happens as lines on its
standard output (``frontend/README.md``); this module starts it, reads them, records the
associations, and hands every stored file to indexer threads that run the node's checks,
link the file into the spool and commit its row (:func:`store.index_file`).

The promise: an acknowledged instance is durable (its file), and its row follows; a file
whose row was not committed when the node stopped is indexed at the next start. The front
end dies with this process (``PR_SET_PDEATHSIG``), so no answer is given while nobody
indexes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ketanode.config import NodeSettings
from ketanode.dicom.sop import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES
from ketanode.logs import exception_summary, safe
from ketanode.receive.associations import AssociationLog
from ketanode.receive.store import Retry, StoreService, index_file

logger = logging.getLogger(__name__)

_READY_SECONDS = 15.0
_STOP_SECONDS = 15.0
_RETRY_SECONDS = 2.0
_PR_SET_PDEATHSIG = 1


class FrontEndError(RuntimeError):
    """The front end cannot be started (no program, no READY line)."""


def program_path(settings: NodeSettings) -> Path:
    """The front end's program, or FrontEndError naming the key."""
    found = shutil.which(settings.receiver_program)
    if found is None:
        raise FrontEndError(
            f"node.receiver_program: {settings.receiver_program!r} is not an executable "
            "program (build it with scripts/build-frontend.sh)"
        )
    return Path(found)


def incoming_dir(spool_root: Path, listener_name: str) -> Path:
    """One directory per listener (several may share a spool)."""
    return spool_root / "incoming" / re.sub(r"[^A-Za-z0-9_.-]", "_", listener_name)


# an association of the front end: (its run's generation, its serial)
_Key = tuple[int, str]


@dataclass(frozen=True)
class _Stored:
    key: _Key | None  # the association's key in the AssociationLog (None: an earlier run's)
    path: Path
    sop_class: str
    sop_uid: str
    ts: str


@dataclass
class _Live:
    """An association the front end accepted: its files not indexed yet, and how it ended
    (None while open). Its row ends once both are settled."""

    pending: int = 0
    aborted: bool | None = None


def _die_with_parent() -> None:  # pragma: no cover (runs in the child before exec)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class FrontEnd:
    """Same interface as :class:`ketanode.receive.listener.Listener`: start, stop."""

    def __init__(
        self,
        settings: NodeSettings,
        store: StoreService,
        log: AssociationLog,
        listener_name: str,
    ) -> None:
        self.settings = settings
        self.program = program_path(settings)  # checked when the node is built
        self.store = store
        self.log = log
        self.incoming = incoming_dir(store.spool.root, listener_name)
        self.process: subprocess.Popen[str] | None = None
        self._work: queue.Queue[_Stored | None] = queue.Queue()
        self._indexers: list[threading.Thread] = []
        self._reader: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._requests: dict[str, tuple[str, str, str]] = {}
        self._live: dict[_Key, _Live] = {}
        self._generation = 0

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        program = self.program
        self.incoming.mkdir(parents=True, exist_ok=True)
        for part in self.incoming.glob("*.part"):  # never acknowledged
            part.unlink(missing_ok=True)
        for _ in range(self.settings.receiver_indexers):
            thread = threading.Thread(target=self._index_loop, name="ketanode-index", daemon=True)
            thread.start()
            self._indexers.append(thread)
        left = sorted(p for p in self.incoming.glob("*.dcm"))
        for path in left:  # acknowledged before the node stopped, not indexed then
            self._queue_left(path)
        if left:
            logger.warning("indexing %d received files left by the last run", len(left))
        port = self.settings.port or _free_port(self.settings.bind_address)
        # Launched, read and launched again by one thread that lives as long as the front
        # end runs: PR_SET_PDEATHSIG is tied to the thread that started the child, so a
        # thread that ended after starting it would kill it.
        started: queue.Queue[BaseException | None] = queue.Queue()
        self._reader = threading.Thread(
            target=self._supervise, args=(program, port, started), name="ketanode-scp", daemon=True
        )
        self._reader.start()
        failure = started.get()
        if failure is not None:
            self._stopping.set()
            raise failure
        logger.info(
            "listening as %s on %s:%s (native front end %s)",
            self.settings.ae_title,
            self.settings.bind_address,
            port,
            program.name,
        )
        return self.settings.bind_address, port

    def _queue_left(self, path: Path) -> None:
        """A file from an earlier run: its UIDs and transfer syntax are in its meta."""
        from pydicom.filereader import read_file_meta_info

        try:
            meta = read_file_meta_info(path)
            self._work.put(
                _Stored(
                    None,
                    path,
                    str(meta.MediaStorageSOPClassUID),
                    str(meta.MediaStorageSOPInstanceUID),
                    str(meta.TransferSyntaxUID),
                )
            )
        except Exception as exc:
            logger.error("cannot read the meta of %s: %s", path.name, exception_summary(exc))
            with contextlib.suppress(OSError):
                path.rename(path.with_suffix(".failed"))

    def _contexts_file(self) -> Path:
        path = self.incoming.parent / f".{self.incoming.name}.contexts"
        syntaxes = ",".join(str(ts) for ts in ACCEPTED_TRANSFER_SYNTAXES)
        path.write_text("".join(f"{uid}\t{syntaxes}\n" for uid in STORAGE_SOP_CLASSES))
        return path

    def _arguments(self, program: Path, port: int) -> list[str]:
        s = self.settings
        args = [
            str(program),
            "--port", str(port),
            "--bind", s.bind_address,
            "--aet", s.ae_title,
            "--incoming", str(self.incoming),
            "--contexts", str(self._contexts_file()),
            "--max-associations", str(s.max_associations),
            "--acse-timeout", str(max(1, round(s.acse_timeout_seconds))),
            "--dimse-timeout", str(max(1, round(s.dimse_timeout_seconds))),
            "--max-pdu", str(s.max_pdu_bytes),
        ]  # fmt: skip
        if s.require_allowed_caller:
            for caller in s.allowed_callers:
                args += ["--allow", f"{caller.ae_title}@{caller.address or '*'}"]
        return args

    def _launch(self, program: Path, port: int) -> subprocess.Popen[str]:
        """Start the front end and wait for its READY line (FrontEndError otherwise)."""
        env = dict(os.environ, TCP_NODELAY="1")
        process = subprocess.Popen(
            self._arguments(program, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="ascii",
            errors="replace",
            bufsize=1,
            env=env,
            preexec_fn=_die_with_parent,
        )
        assert process.stdout is not None and process.stderr is not None
        first = _read_line(process.stdout, _READY_SECONDS)
        if not first.startswith("READY\t"):
            process.kill()
            _, err = process.communicate(timeout=5)
            raise FrontEndError(
                f"{program.name} did not start (port {port}): {safe(err.strip()[-500:], 500)}"
            )
        self._generation += 1
        self.process = process
        threading.Thread(
            target=self._log_stderr, args=(process.stderr,), name="ketanode-scp-err", daemon=True
        ).start()
        return process

    def _supervise(
        self, program: Path, port: int, started: queue.Queue[BaseException | None]
    ) -> None:
        try:
            process = self._launch(program, port)
        except (FrontEndError, OSError) as exc:
            started.put(exc)
            return
        started.put(None)
        while True:
            code = self._read_events(process, self._generation)
            if self._stopping.is_set():
                logger.info("front end stopped (exit status %s)", code)
                return
            logger.error("the front end exited with status %s; starting it again", code)
            while True:
                try:
                    process = self._launch(program, port)
                    logger.info("front end started again on port %s", port)
                    break
                except (FrontEndError, OSError) as exc:
                    logger.error("could not start the front end again: %s", safe(str(exc), 500))
                    if self._stopping.wait(_RETRY_SECONDS):
                        return

    def stop(self) -> None:
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("the front end did not stop in %s s: killed", _STOP_SECONDS)
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        for _ in self._indexers:
            self._work.put(None)
        for thread in self._indexers:
            thread.join(timeout=30)
        self._indexers.clear()

    def _log_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            logger.warning("front end: %s", safe(line.rstrip(), 500))

    # -- the front end's lines ----------------------------------------------------

    def _read_events(self, process: subprocess.Popen[str], generation: int) -> int:
        """Its lines until it exits; returns its exit status."""
        assert process.stdout is not None
        for line in process.stdout:
            try:
                self._event(generation, line.rstrip("\n").split("\t"))
            except Exception as exc:  # a line it cannot read must not stop the others
                logger.error("front end line not understood: %s", exception_summary(exc))
        code = process.wait()
        with self._lock:
            left_open = [
                key
                for key, live in self._live.items()
                if key[0] == generation and live.aborted is None
            ]
        for key in left_open:  # it died with these open
            self._end(key, aborted=True)
        return code

    def _event(self, generation: int, fields: list[str]) -> None:
        """One line: its kind, the association's serial, then the kind's fields (a short
        line raises, and the caller logs it as not understood)."""
        kind, serial = fields[0], fields[1]
        key = (generation, serial)
        if kind == "REQUEST":
            with self._lock:
                self._requests[serial] = (fields[2], fields[3], fields[4])
        elif kind == "ACCEPT":
            with self._lock:
                calling, called, peer = self._requests.pop(serial, ("", "", ""))
                self._live[key] = _Live()
            self.log.opened(key, calling, called, peer, 0)
        elif kind == "REJECT":
            with self._lock:
                calling, called, peer = self._requests.pop(serial, ("", "", ""))
            self.log.refused(calling, called, peer, 0, fields[2] if len(fields) > 2 else "")
        elif kind == "STORED":
            with self._lock:
                self._live[key].pending += 1
            self._work.put(_Stored(key, self.incoming / fields[2], fields[3], fields[4], fields[5]))
        elif kind == "FAILED":
            logger.warning(
                "front end refused a C-STORE with 0x%s: %s",
                safe(fields[2], 8),
                safe(fields[3] if len(fields) > 3 else "", 300),
            )
        elif kind == "END":
            self._end(key, aborted=len(fields) > 2 and fields[2] == "aborted")

    def _end(self, key: _Key, aborted: bool) -> None:
        """The association's row ends once every file it brought is indexed."""
        with self._lock:
            live = self._live.get(key)
            if live is None or live.aborted is not None:
                return
            live.aborted = aborted
        self._settle(key)

    def _settle(self, key: _Key) -> None:
        with self._lock:
            live = self._live.get(key)
            if live is None or live.pending > 0 or live.aborted is None:
                return
            del self._live[key]
        self.log.ended(key, live.aborted)

    # -- indexing -------------------------------------------------------------------

    def _index_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            while True:
                try:
                    index_file(
                        self.store,
                        item.path,
                        item.ts,
                        item.sop_class or None,
                        item.sop_uid or None,
                        self.log.key_row_id(item.key) if item.key is not None else None,
                    )
                    break
                except Retry as exc:
                    logger.warning("indexing delayed (%s): again in %s s", exc, _RETRY_SECONDS)
                    if self._stopping.wait(_RETRY_SECONDS):
                        break  # the file stays; the next start indexes it
                except Exception as exc:  # index_file records its own faults
                    logger.error("indexer: %s", exception_summary(exc))
                    break
            if item.key is not None:
                with self._lock:
                    self._live[item.key].pending -= 1
                self._settle(item.key)


def _read_line(stream: IO[str], timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])
