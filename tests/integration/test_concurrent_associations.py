"""Several associations bring the same new series at once (a scanner or PACS that sends in
parallel): every instance is stored exactly once, in one series row.

On PostgreSQL the first instances of each association race to create the study and series
rows; the losers used to be answered "success" as if they were duplicates, without a row.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.conftest import RunningNode
from tests.integration.dicomtools import TEST_AE, small_series
from tests.support import STORESCU, dcmtk_env

N_SLICES = 24
N_ASSOCIATIONS = 4


def _send_in_parallel(port: int, files: list[Path]) -> None:
    parts = [files[i::N_ASSOCIATIONS] for i in range(N_ASSOCIATIONS)]
    procs = [
        subprocess.Popen(
            [
                STORESCU,
                "-aet",
                TEST_AE,
                "-aec",
                "KETANODE",
                "127.0.0.1",
                str(port),
                *map(str, part),
            ],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for part in parts
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-2000:]


def test_one_new_series_over_four_associations_at_once(node: RunningNode, tmp_path: Path) -> None:
    sent = 0
    for round_ in range(3):  # each round is a new study and series: a new race
        files = small_series(tmp_path / f"s{round_}", N_SLICES)
        _send_in_parallel(node.port, files)
        sent += len(files)
        series = node.series()
        assert len(series) == round_ + 1
        assert len(node.instances()) == sent
        assert sorted(s.n_instances for s in series) == [N_SLICES] * (round_ + 1)
    files_in_spool = [p for p in node.spool_root.rglob("*.dcm") if "rejected" not in p.parts]
    assert len(files_in_spool) == sent
    assert node.failures() == []
