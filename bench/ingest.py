"""Ingest benchmark: how many instances per second each receiver takes from DCMTK storescu.

    python bench/ingest.py [--repeats 3] [--instances 192] [--no-postgres]
    python bench/ingest.py --study 5000 [--study-syntaxes native,jpeg-lossless,jpeg2000]

A generated MR series (256x256 slices, 16 bit, about 129 KB per file) is sent by DCMTK
``storescu`` over one association, and split in four parts sent by four ``storescu``
processes at once (four associations), to:

* ``ketanode``     the node as ``ketanode serve`` (default settings but ports and paths;
                   SQLite, WAL, synchronous=FULL; durable: fsync + link + row before 0x0000)
* ``ketanode-pg``  the same with PostgreSQL (when the server at 127.0.0.1:5432 answers)
* ``ketanode-scp``, ``ketanode-scp-pg`` (with ``--peers``) the node with its native front end
                   (``node.receiver = "dcmtk"``): the answer waits for the durable file, the
                   row follows; ``all_held_inst_per_s`` is the rate until every row is in
* ``orthanc``      Debian Orthanc with a generated config
* ``storescp``     DCMTK storescp (writes the files, no fsync, no index: the floor; without
                   --fork it serves one association at a time)

With ``--study N`` (issue 17's case, off by default for its length), a study of N small
images (128x128, 16 bit, one series, like a DTI) is also sent over one association, once per
transfer syntax: ``native`` (explicit VR little endian, about 33 KB per file),
``jpeg-lossless`` (JPEG Lossless SV1, made with DCMTK ``dcmcjpeg``) and ``jpeg2000``
(JPEG 2000 lossless, made with pydicom and pylibjpeg-openjpeg); every peer stores them as
received. storescp takes only the native one (without ``+xa`` it refuses compressed
syntaxes, and its options are left as they are).

Every peer run starts the peer on fresh storage, times from the first storescu start to
the last storescu exit, and then checks that the peer really holds every instance
(ketanode: rows and spool files; Orthanc: /statistics; storescp: files). A run that does
not verify fails the benchmark. Each measurement is repeated; the median is reported.

Output: one JSON line per peer x mode (median, min, max, every run, instances held), then
one summary line with the ratios ketanode/Orthanc: of the medians, and "_paired", the median
of the per-repeat ratios (each repeat runs every peer back to back, which keeps a busy spell
of a shared machine out of the ratio). A failed verification is reported
(``"verified": false``) and makes the exit status 1. Progress goes to stderr. Every process
started here is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ketanode.synthetic.phantom import simple_head  # noqa: E402
from ketanode.synthetic.series_writer import SeriesSpec, write_series  # noqa: E402
from tests.peers import Orthanc, StoreSCP  # noqa: E402
from tests.support import (  # noqa: E402
    ECHOSCU,
    STORESCU,
    NodeProcess,
    dcmtk_env,
    free_port,
    postgres_database,
    wait_for,
)

CALLING_AE = "STORESCU"


def log(msg: str) -> None:
    print(f"[ingest] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Peers: each is a context manager that yields (port, called AE, count function)
# ---------------------------------------------------------------------------------------


@dataclass
class Target:
    port: int
    called_ae: str
    count: Callable[[], int]
    details: Callable[[], dict[str, Any]] = field(default=lambda: {})


def _count_files(root: Path, pattern: str) -> int:
    return sum(1 for p in root.rglob(pattern) if p.is_file())


@contextmanager
def ketanode_peer(
    workdir: Path, db_url: str | None, receiver: str = "pynetdicom"
) -> Iterator[Target]:
    url = db_url or f"sqlite:///{workdir / 'ketanode.db'}"
    # Default settings except the ports and the paths (NodeProcess turns on DEBUG logs for
    # tests; the benchmark keeps the default INFO) and the receiver.
    overrides = {"logging": {"level": "INFO"}, "node": {"receiver": receiver}}
    node = NodeProcess(workdir, url, overrides=overrides)
    node.start()
    try:

        def rows() -> int:
            if db_url is None:
                with sqlite3.connect(workdir / "ketanode.db") as conn:
                    return int(conn.execute("SELECT count(*) FROM instance").fetchone()[0])
            import psycopg

            with psycopg.connect(db_url) as conn:
                row = conn.execute("SELECT count(*) FROM instance").fetchone()
                return int(row[0]) if row else 0

        def count() -> int:
            # Both must hold: a committed row per instance and its file in the spool.
            files = sum(
                1
                for p in node.spool.rglob("*.dcm")
                if p.is_file()
                and p.parent.name != "rejected"
                and ".tmp" not in p.parts
                and "incoming" not in p.parts  # the front end's, not yet indexed
            )
            return min(rows(), files)

        def details() -> dict[str, Any]:
            refused = node.log_text().count("C-STORE refused")
            return {"refused": refused} if refused else {}

        yield Target(node.port, node.ae_title, count, details)
    finally:
        # The completed series' conversion job may start as the run ends; on a loaded
        # machine the worker's process takes a while to finish it before the node exits.
        node.stop(timeout=180)


@contextmanager
def orthanc_peer(workdir: Path) -> Iterator[Target]:
    orthanc = Orthanc(
        workdir, extra_modalities={"storescu": {"AET": CALLING_AE, "Host": "127.0.0.1", "Port": 1}}
    )
    orthanc.start()
    try:
        yield Target(orthanc.dicom_port, orthanc.aet, orthanc.count_instances)
    finally:
        orthanc.stop()


# the receivers compared with Orthanc in the summary's ratios
NODE_LIKE = (
    "ketanode",
    "ketanode-pg",
    "ketanode-scp",
    "ketanode-scp-pg",
    "pynetdicom-null",
    "pynetdicom-file",
    "storescp-fsync",
)

# DCMTK storescp as a durable front end would run it: a process per association, and the
# C-STORE response held until a command run synchronously after each file (storescp runs
# --exec-on-reception before it answers) has fsynced the file and its directory.
DURABLE_STORESCP = ("--fork", "--exec-on-reception", "sync #p/#f #p", "--exec-sync")


@contextmanager
def storescp_peer(workdir: Path, durable: bool = False) -> Iterator[Target]:
    scp = StoreSCP(workdir / "out", extra_args=DURABLE_STORESCP if durable else ())
    scp.start()
    try:
        yield Target(scp.port, scp.aet, lambda: _count_files(scp.workdir, "MR.*"))
    finally:
        scp.stop()


@contextmanager
def pynetdicom_peer(workdir: Path, mode: str) -> Iterator[Target]:
    """bench/pynetdicom_scp.py in its own process: the protocol library's ceiling (null) and
    the durable file without rows (file)."""
    port = free_port()
    out = workdir / "ceiling"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "pynetdicom_scp.py"), "--port", str(port)]
        + ["--mode", mode, "--out", str(out), "--ae-title", "CEILING"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: (out / "ready").exists() or proc.poll() is not None, timeout=60)
        if proc.poll() is not None:
            raise RuntimeError(f"pynetdicom_scp.py failed: {proc.stderr.read()[-2000:]!r}")

        def count() -> int:
            try:
                return int((out / "count").read_text() or 0)
            except FileNotFoundError:
                return 0

        yield Target(port, "CEILING", count)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------------------


def echo(target: Target) -> None:
    """One C-ECHO first, so that the timed run does not include the peer's start-up."""
    proc = subprocess.run(
        [ECHOSCU, "-aet", CALLING_AE, "-aec", target.called_ae, "127.0.0.1", str(target.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"echoscu failed: {proc.stderr[-1000:]}")


def send(target: Target, parts: list[list[Path]], scu_args: tuple[str, ...] = ()) -> float:
    """Start one storescu per part at once; return the seconds until the last one exits."""
    procs: list[subprocess.Popen[bytes]] = []
    failed = []
    with ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in parts]
        try:
            start = time.perf_counter()
            for files, err in zip(parts, logs, strict=True):
                procs.append(
                    subprocess.Popen(
                        [
                            STORESCU,
                            "-aet",
                            CALLING_AE,
                            "-aec",
                            target.called_ae,
                            *scu_args,
                            "127.0.0.1",
                            str(target.port),
                            *[str(f) for f in files],
                        ],
                        env=dcmtk_env(),
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                )
            for proc, err in zip(procs, logs, strict=False):
                rc = proc.wait(600)
                if rc != 0:
                    err.seek(0)
                    tail = err.read().decode(errors="replace")[-800:]
                    failed.append(f"storescu exited {rc}: {tail}")
            seconds = time.perf_counter() - start
        finally:
            for proc in procs:  # nothing may outlive a run
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    if failed:
        raise RuntimeError("; ".join(failed))
    return seconds


def split(files: list[Path], n: int) -> list[list[Path]]:
    size = -(-len(files) // n)
    return [files[i : i + size] for i in range(0, len(files), size)]


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def make_series(out: Path, n: int) -> list[Path]:
    volume = simple_head((n, 256, 256)) * 2.0
    spec = SeriesSpec(
        patient_name="BENCH^INGEST",
        patient_id="BENCH-0001",
        accession_number="BENCH1",
        vendor="siemens",
        orientation="sagittal",
    )
    return write_series(volume, (1.0, 1.0, 1.0), out, spec)


STUDY_SYNTAXES = ("native", "jpeg-lossless", "jpeg2000")
# storescu proposes the uncompressed syntaxes unless told: JPEG Lossless SV1 (-xs), JPEG
# 2000 lossless (-xv)
_PROPOSE = {"native": (), "jpeg-lossless": ("-xs",), "jpeg2000": ("-xv",)}
_STUDY_TEMPLATES = 24  # distinct slices; the study repeats them under new UIDs


def make_study(out: Path, n: int, syntax: str) -> list[Path]:
    """``n`` 128x128 MR instances in one series (a DTI-like study that the default
    selection rules ignore: no conversion job after each run), in ``syntax``."""
    from pydicom import dcmread
    from pydicom.uid import JPEG2000Lossless, generate_uid

    volume = simple_head((_STUDY_TEMPLATES, 128, 128)) * 2.0
    spec = SeriesSpec(
        patient_name="BENCH^STUDY",
        patient_id="BENCH-0002",
        accession_number="BENCH2",
        vendor="siemens",
        orientation="axial",
        series_description="ep2d_diff_mddw_64dir",
        protocol_name="ep2d_diff_mddw_64dir",
        mr_acquisition_type="2D",
        image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"),
    )
    templates = write_series(volume, (2.0, 2.0, 2.0), out / "templates", spec)
    if syntax == "jpeg-lossless":  # DCMTK's encoder (pydicom has none for this syntax)
        encoded = []
        for src in templates:
            dst = src.with_suffix(".jpl.dcm")
            subprocess.run(["dcmcjpeg", "+e1", str(src), str(dst)], check=True, timeout=60)
            encoded.append(dst)
        templates = encoded
    elif syntax == "jpeg2000":
        for src in templates:
            ds = dcmread(src)
            ds.compress(JPEG2000Lossless)
            ds.save_as(src, enforce_file_format=True)
    elif syntax != "native":
        raise ValueError(f"unknown syntax {syntax!r}; one of {', '.join(STUDY_SYNTAXES)}")
    sources = [dcmread(p) for p in templates]
    prefix = generate_uid()[:40]
    files = []
    (out / syntax).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds = sources[i % len(sources)]
        uid = f"{prefix}.{i + 1}"
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.ImagesInAcquisition = n
        path = out / syntax / f"MR{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def postgres_available() -> bool:
    try:
        import psycopg

        from tests.support import PG_ADMIN_URL

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


def run_one(
    peer: str, mode_parts: int, files: list[Path], root: Path, scu_args: tuple[str, ...] = ()
) -> tuple[float, int, float]:
    """One timed run on fresh storage; returns (seconds until the last answer, instances the
    peer then holds, seconds until it held them all: later than the answers only for the
    native front end, whose rows follow its answers)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{peer}-{mode_parts}-", dir=root))
    try:
        with ExitStack() as stack:
            if peer == "ketanode":
                target = stack.enter_context(ketanode_peer(workdir, None))
            elif peer == "ketanode-pg":
                url = stack.enter_context(postgres_database())
                target = stack.enter_context(ketanode_peer(workdir, url))
            elif peer == "ketanode-scp":
                target = stack.enter_context(ketanode_peer(workdir, None, "dcmtk"))
            elif peer == "ketanode-scp-pg":
                url = stack.enter_context(postgres_database())
                target = stack.enter_context(ketanode_peer(workdir, url, "dcmtk"))
            elif peer == "orthanc":
                target = stack.enter_context(orthanc_peer(workdir))
            elif peer in ("storescp", "storescp-fsync"):
                target = stack.enter_context(storescp_peer(workdir, peer == "storescp-fsync"))
            elif peer in ("pynetdicom-null", "pynetdicom-file"):
                target = stack.enter_context(pynetdicom_peer(workdir, peer.split("-")[1]))
            else:
                raise ValueError(peer)
            echo(target)
            start = time.perf_counter()
            seconds = send(target, split(files, mode_parts), scu_args)
            # Verify: every peer answers a C-STORE after its file is durable; the node's
            # native front end indexes the file after (its row follows), the others hold
            # rows and files at once. The time until all are held is reported too.
            try:
                wait_for(lambda: target.count() >= len(files), timeout=300, interval=0.02)
            except AssertionError:
                log(
                    f"VERIFY FAILED: {peer} ({mode_parts} associations) holds "
                    f"{target.count()} of {len(files)} instances {target.details()}"
                )
            held_seconds = max(seconds, time.perf_counter() - start)
            return seconds, target.count(), held_seconds
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Case:
    name: str  # "series", or "study-<syntax>"
    files: list[Path]
    associations: int
    peers: list[str]
    scu_args: tuple[str, ...] = ()  # storescu's proposal of the files' transfer syntax

    @property
    def key(self) -> str:  # in the summary's keys
        suffix = "" if self.name == "series" else "_" + self.name.replace("-", "_")
        return f"{self.associations}assoc{suffix}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--instances", type=int, default=192)
    ap.add_argument(
        "--peers",
        default="ketanode,ketanode-pg,orthanc,storescp",
        help="comma-separated subset of ketanode,ketanode-pg,orthanc,storescp; also "
        "pynetdicom-null and pynetdicom-file (bench/pynetdicom_scp.py: the protocol library "
        "alone, and with the durable file but no rows), storescp-fsync (storescp answering "
        "after an fsync of each file, a process per association), ketanode-scp and "
        "ketanode-scp-pg (the node with its native front end, node.receiver = 'dcmtk')",
    )
    ap.add_argument("--modes", default="1,4", help="associations per run, comma-separated")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument(
        "--study",
        type=int,
        default=0,
        help="also send a study of this many 128x128 images over one association (5000)",
    )
    ap.add_argument(
        "--study-syntaxes",
        default=",".join(STUDY_SYNTAXES),
        help=f"transfer syntaxes of the study, comma-separated: {', '.join(STUDY_SYNTAXES)}",
    )
    ap.add_argument("--no-series", action="store_true", help="only the study (with --study)")
    args = ap.parse_args(argv)

    peers = [p for p in args.peers.split(",") if p]
    if args.no_postgres or not postgres_available():
        log("PostgreSQL not used (--no-postgres or no server at 127.0.0.1:5432)")
        peers = [p for p in peers if not p.endswith("-pg")]
    modes = [int(m) for m in args.modes.split(",")]

    root = Path(tempfile.mkdtemp(prefix="ketanode-bench-ingest-"))
    try:
        cases: list[Case] = []
        if not args.no_series:
            files = make_series(root / "series", args.instances)
            sizes = [f.stat().st_size for f in files]
            log(f"series: {len(files)} files, {sum(sizes) / len(files) / 1024:.1f} KiB each")
            cases += [Case("series", files, mode, peers) for mode in modes]
        if args.study:
            for syntax in [x for x in args.study_syntaxes.split(",") if x]:
                study = make_study(root / "study", args.study, syntax)
                size = sum(f.stat().st_size for f in study) / len(study)
                log(f"study {syntax}: {len(study)} files, {size / 1024:.1f} KiB each")
                takers = [p for p in peers if syntax == "native" or not p.startswith("storescp")]
                cases.append(Case(f"study-{syntax}", study, 1, takers, _PROPOSE[syntax]))
        results: dict[tuple[str, str], list[float]] = {
            (p, c.key): [] for c in cases for p in c.peers
        }
        held: dict[tuple[str, str], list[int]] = {k: [] for k in results}
        held_times: dict[tuple[str, str], list[float]] = {k: [] for k in results}
        # Interleave: repeat r runs every peer and case once, so a slow spell of the
        # machine spreads over all peers instead of hitting one.
        for r in range(args.repeats):
            for case in cases:
                for peer in case.peers:
                    seconds, count, held_seconds = run_one(
                        peer, case.associations, case.files, root, case.scu_args
                    )
                    results[(peer, case.key)].append(seconds)
                    held[(peer, case.key)].append(count)
                    held_times[(peer, case.key)].append(held_seconds)
                    log(
                        f"repeat {r + 1}: {peer:12s} {case.name:20s} {case.associations} assoc "
                        f"{seconds:7.2f} s  {len(case.files) / seconds:6.1f} inst/s  "
                        f"(load {os.getloadavg()[0]:.1f})"
                    )
        medians: dict[tuple[str, str], float] = {}
        ok = True
        for case in cases:
            sizes = [f.stat().st_size for f in case.files]
            common = {
                "bench": "ingest",
                "case": case.name,
                "instances": len(case.files),
                "bytes_per_instance": round(sum(sizes) / len(sizes)),
                "repeats": args.repeats,
                "host_cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
            for peer in case.peers:
                secs = results[(peer, case.key)]
                med = statistics.median(secs)
                medians[(peer, case.key)] = len(case.files) / med
                line = {
                    **common,
                    "peer": peer,
                    "mode": "single" if case.associations == 1 else "parallel",
                    "associations": case.associations,
                    "seconds": round(med, 3),
                    "inst_per_s": round(len(case.files) / med, 1),
                    "inst_per_s_min": round(len(case.files) / max(secs), 1),
                    "inst_per_s_max": round(len(case.files) / min(secs), 1),
                    "seconds_all": [round(s, 3) for s in secs],
                    "held": held[(peer, case.key)],
                    # until every instance had its row and its file (a poll every 20 ms)
                    "all_held_inst_per_s": round(
                        len(case.files) / statistics.median(held_times[(peer, case.key)]), 1
                    ),
                    "verified": all(h == len(case.files) for h in held[(peer, case.key)]),
                }
                ok = ok and line["verified"]
                print(json.dumps(line), flush=True)
        summary: dict[str, Any] = {"bench": "ingest", "summary": True}
        for case in cases:
            for node in NODE_LIKE:
                if (node, case.key) in medians and ("orthanc", case.key) in medians:
                    key = f"ratio_{node.replace('-', '_')}_orthanc_{case.key}"
                    summary[key] = round(
                        medians[(node, case.key)] / medians[("orthanc", case.key)], 2
                    )
                    # Paired: each repeat runs the two back to back, so the median of the
                    # per-repeat ratios shrugs off a busy spell of a shared machine.
                    paired = [
                        o / k
                        for k, o in zip(
                            results[(node, case.key)], results[("orthanc", case.key)], strict=True
                        )
                    ]
                    summary[key + "_paired"] = round(statistics.median(paired), 2)
        summary.update({f"{p}_{k}_inst_per_s": round(v, 1) for (p, k), v in medians.items()})
        summary["load_average"] = [round(x, 2) for x in os.getloadavg()]
        summary["verified"] = ok
        print(json.dumps(summary), flush=True)
        return 0 if ok else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
